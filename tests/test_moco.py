"""MoCo v2: queue, momentum encoder, shuffled BatchNorm groups, recipes, and runs through the one loop
(command line, resume, 8 devices, TFDS)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import checks
from sslx import methods
from sslx import numerics
from sslx import optim
from sslx import train
from sslx.methods import moco
from sslx.models import heads
import contrastive_helpers as helpers
from test_configs import SslxTinyRgb, load_config

CONFIG = "mocov2_fashion_mnist"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a queue of 2 batches, 2 BatchNorm groups,
  a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def _config(**overrides):
  return helpers.tiny_config(CONFIG, **overrides)


def _views(batch_size, seed):
  rng = np.random.default_rng(seed)
  return {f"view_{i}": rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32) for i in range(2)}


def test_enqueue_is_a_fifo_of_whole_batches():
  queue, pointer = jnp.zeros((6, 1)), jnp.zeros((), jnp.int32)
  for value in (1, 2, 3, 4):
    queue, pointer = moco.enqueue(queue, pointer, jnp.full((2, 1), float(value)))
  # K / B = 3 batches: the newest (4) overwrote the oldest (1); the pointer is at the next oldest (2).
  np.testing.assert_array_equal(queue[:, 0], [4, 4, 2, 2, 3, 3])
  assert int(pointer) == 2


def test_steps_fill_the_queue_and_move_the_key_encoder_by_its_momentum():
  """Three steps of the loop's jitted step at batch 8 with a queue of 2 batches (one BatchNorm group, so a
  step's keys do not depend on its shuffle): the queue holds the keys of steps 2 and 3, each computed by the
  key encoder the step started from, and the key encoder is the momentum average of the query encoders."""
  config = _config(batch_size=8, **{"method.queue_size": 16, "model.bn_groups": 1, "method.momentum": 0.9})
  method = methods.build_method(config)
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=10, total_steps=10)
  state = nn.unbox(train.init_train_state(method, tx, jax.random.PRNGKey(0), (28, 28, 1)))
  step = jax.jit(train.make_train_step(method, tx, schedules))
  model = heads.encoder_with_head(config)
  keys, query_params = [], []
  for index in range(3):
    batch = _views(8, index)
    (projections, _), _ = model.apply(state.method_state["key"], batch["view_1"], train=True,
                                      mutable=["batch_stats"])
    keys.append(numerics.l2_normalize(projections))
    state, _ = step(state, batch)
    query_params.append(state.params)
  queue = state.method_state["queue"]
  assert int(state.method_state["queue_pointer"]) == 8
  np.testing.assert_allclose(queue[:8], keys[2], atol=2e-5)  # step 3 wrapped around to the front
  np.testing.assert_allclose(queue[8:], keys[1], atol=2e-5)
  # The first update copies the query encoder; the next two average with m = 0.9.
  m = 0.9
  expected = jax.tree.map(lambda q1, q2, q3: m * m * q1 + m * (1 - m) * q2 + (1 - m) * q3, *query_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               state.method_state["key"]["params"], expected)


def test_only_the_query_encoder_gets_a_gradient():
  method = methods.build_method(_config(batch_size=8, **{"method.queue_size": 16}))
  batch = _views(8, 0)
  variables, method_state = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": batch["view_0"][:1]}))

  def loss_of(params, key, queue):
    state = {**method_state, "key": key, "queue": queue}
    return method.loss_fn({**variables, "params": params}, state, batch, jax.random.PRNGKey(1))[0]

  grads = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)))(variables["params"], method_state["key"],
                                                         method_state["queue"])
  query_grads, key_and_queue_grads = grads[0], grads[1:]
  assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(key_and_queue_grads))
  assert float(np.abs(query_grads["encoder"]["stem_conv"]["kernel"]).max()) > 0


def test_keys_are_normalised_by_the_groups_of_the_shuffled_batch():
  """With 2 groups, key i is what the key encoder gives when it sees only the half of the shuffled batch that
  holds image i; the shuffle changes which images share statistics, hence the keys."""
  config = _config()
  model = heads.encoder_with_head(config)
  images = _views(32, 0)["view_1"]
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), images[:1], train=False))
  order = jax.random.permutation(jax.random.PRNGKey(5), 32)
  keys, key_state = moco.shuffled_keys(model, variables, images, order, jax.random.PRNGKey(6))
  one_group = model.clone(encoder=model.encoder.clone(bn_groups=1), head=model.head.clone(bn_groups=1))
  expected = np.zeros_like(keys)
  group_stats = []
  for half in (order[:16], order[16:]):
    (projections, _), stats = one_group.apply(variables, images[half], train=True, mutable=["batch_stats"])
    expected[np.asarray(half)] = numerics.l2_normalize(projections)
    group_stats.append(stats["batch_stats"])
  np.testing.assert_allclose(keys, expected, atol=1e-5)
  # Running statistics: the mean of the two groups' updates.
  jax.tree.map(lambda got, a, b: np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-7),
               key_state["batch_stats"], *group_stats)
  in_order, _ = moco.shuffled_keys(model, variables, images, jnp.arange(32), jax.random.PRNGKey(6))
  assert float(np.abs(in_order - keys).max()) > 1e-3


@pytest.mark.parametrize("key, value, message", [
    ("method.queue_size", 48, r"config\.method\.queue_size=48 must be a multiple of the global batch "
                              r"config\.batch_size=32"),
    ("model.bn_groups", 3, r"config\.model\.bn_groups=3 must split the 32 rows"),
    ("model.bn_groups", 32, r"config\.model\.bn_groups=32 must split the 32 rows .* 2 or more rows"),
    ("data.views", ("random_resized_crop(28)",), r"consumes 2 views but config\.data\.views="),
    ("method.momentum", 1.0, r"config\.method\.momentum=1\.0 must be a number in \[0, 1\)"),
    ("method.head.kernel_init_std", -1.0, r"config\.method\.head\.kernel_init_std=-1\.0"),
])
def test_bad_configs_name_the_key(key, value, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**{key: value}))


def test_imagenet_recipe():
  config = load_config("mocov2_resnet50")
  assert (config.batch_size, config.num_epochs) == (256, 200)
  mc = config.method
  assert (mc.queue_size, mc.momentum, mc.temperature, config.model.bn_groups) == (65536, 0.999, 0.2, 8)
  head = mc.head
  assert (head.num_layers, head.hidden_dim, head.out_dim, head.batch_norm) == (2, 2048, 128, False)
  opt = config.optimizer
  assert (opt.name, opt.base_lr, opt.momentum, opt.weight_decay) == ("sgd", 0.03, 0.9, 1e-4)
  assert opt.wd_mults == ((".*", 1.0),) and config.schedule.warmup_epochs == 0.0
  view = config.data.views[0]
  assert view == config.data.views[1]
  assert "scale=(0.2, 1.0), interpolation='bilinear'" in view and view.endswith("|hflip")
  assert "color_jitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8)|grayscale(p=0.2)" in view


def test_cli_run_writes_checkpoints_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  state = helpers.read_state(cli_run, 6)
  assert state["['method_state']['queue']"].shape == (64, 128)
  assert int(state["['method_state']['queue_pointer']"]) == (6 * 32) % 64
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)


def test_eight_devices_train_as_one(cli_run, tmp_path):
  """The batch split over 8 devices: the same losses, parameters, BatchNorm statistics, key encoder and queue,
  and the queue (like every replicated array) the same on every device."""
  helpers.train_on_eight_devices(CONFIG, tmp_path / "eight")
  helpers.assert_same_steps(tmp_path / "eight", cli_run)


def test_local_recipe_trains_on_a_tfds_dataset(tmp_path):
  """Two steps of configs/mocov2_resnet50.py:local on a 24-image TFDS dataset in the array_record format."""
  data_dir = str(tmp_path / "tfds")
  SslxTinyRgb(data_dir=data_dir, file_format="array_record").download_and_prepare()
  config = load_config("mocov2_resnet50", "local")
  config.unlock()
  config.data.update(dict(dataset="sslx_tiny_rgb", data_dir=data_dir))
  config.total_steps = 2
  config.monitor.every_steps = 0
  state, last = train.train(config, str(tmp_path / "run"))
  assert int(state.step) == 2 and np.isfinite(last["loss"])
  assert state.method_state["queue"].shape == (32, 128) and int(state.method_state["queue_pointer"]) == 16
