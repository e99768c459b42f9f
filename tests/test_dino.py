"""DINO: the teacher (no gradient, scheduled moving average), multi-crop passes, centre, frozen last layer, collapse
flag, attention pictures, configs and recipes, and runs through the one loop (command line, resume, 8 devices)."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from sslx import checks
from sslx import losses
from sslx import methods
from sslx import optim
from sslx import recipes_distillation
from sslx import step_metrics
from sslx import train
from sslx import viz
from sslx.evaluate import run as eval_run
from sslx.methods import RunLength
from sslx.methods import dino
from sslx.models import attention_weights
import contrastive_helpers as helpers
from test_configs import load_config

CONFIG = "dino_fashion_mnist"
SIZES = (28, 28, 16, 16)  # the :test config's crops: 2 global, 2 local
RUN_LENGTH = RunLength(steps_per_epoch=2, total_steps=6)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 16, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def _crops(batch_size, seed):
  rng = np.random.default_rng(seed)
  return {f"view_{i}": rng.normal(size=(batch_size, size, size, 1)).astype(np.float32)
          for i, size in enumerate(SIZES)}


@pytest.fixture(scope="module")
def fresh():
  """A fresh DINO at batch 8 without drop path, the last layer frozen for 1 epoch of 2 steps, a non-zero centre:
  (config, method, variables, method_state, batch), and the jitted ``(params, teacher, center) -> ((loss, aux),
  grads)`` evaluated at the fresh state."""
  config = helpers.tiny_config(CONFIG, batch_size=8, **{"model.drop_path_rate": 0.0})
  recipes_distillation.freeze_last_layer(config, 1)
  method = methods.build_method(config, RUN_LENGTH)
  batch = _crops(8, 0)
  variables, method_state = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": batch["view_0"][:1]}))
  method_state["center"] = np.random.default_rng(1).normal(size=method_state["center"].shape).astype(np.float32)

  def loss_of(params, teacher, center):
    return method.loss_fn({**variables, "params": params}, {**method_state, "teacher": teacher, "center": center},
                          batch, jax.random.PRNGKey(1))

  value_and_grad = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True))
  (loss, aux), grads = value_and_grad(variables["params"], method_state["teacher"], method_state["center"])
  return dict(config=config, method=method, variables=variables, method_state=method_state, batch=batch,
              value_and_grad=value_and_grad, loss=loss, aux=aux, grads=grads)


def _max_abs(tree):
  return max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(tree))


def test_only_the_student_gets_a_gradient_and_not_its_frozen_last_layer(fresh):
  assert set(fresh["variables"]["params"]) == set(fresh["method_state"]["teacher"]["params"]) == {"encoder", "head"}
  student_grads, teacher_grads = fresh["grads"]
  assert _max_abs(teacher_grads) == 0
  assert _max_abs(student_grads["encoder"]) > 0
  head = student_grads["head"]
  assert all(_max_abs(head[name]) > 0 for name in head if name != "last_layer")
  assert _max_abs(head["last_layer"]) == 0  # step 0 of a frozen epoch


def test_loss_and_centre_are_dino_over_one_encoder_call_per_resolution(fresh):
  """The loss and the new centre equal `losses.dino_loss` and ``0.9 c + 0.1 mean(teacher logits)`` (numpy) of
  logits computed crop by crop; the student's encoder ran once per resolution (2 global crops in one call, 2
  local in another) and its head once on all 4 crops."""
  config, variables, method_state, batch = fresh["config"], fresh["variables"], fresh["method_state"], fresh["batch"]
  student, teacher = dino.networks(config)
  crops = [batch[f"view_{i}"] for i in range(len(SIZES))]

  def logits(model, model_variables, some_crops):
    return np.concatenate([model.apply(model_variables, [crop], train=True) for crop in some_crops])

  student_logits = logits(student, variables, crops)
  teacher_logits = logits(teacher, method_state["teacher"], crops[:2])
  expected = losses.dino_loss(student_logits, teacher_logits, method_state["center"], student_temperature=0.1,
                              teacher_temperature=0.04)
  metrics, new_state, _ = fresh["aux"]
  np.testing.assert_allclose(fresh["loss"], expected.loss, rtol=1e-5)
  for name in ("teacher_entropy", "kl"):
    np.testing.assert_allclose(metrics[name], getattr(expected, name), rtol=1e-4, atol=1e-5)
  assert float(metrics["teacher_temperature"]) == pytest.approx(0.04) and float(metrics["collapse"]) == 0
  centre = 0.9 * method_state["center"] + 0.1 * teacher_logits.mean(axis=(0, 1))
  np.testing.assert_allclose(new_state["center"], centre, rtol=1e-5, atol=1e-6)

  is_call = lambda module, method: method == "__call__" and module.path in (("encoder",), ("head",))
  _, state = student.apply(variables, crops, train=True, capture_intermediates=is_call, mutable=["intermediates"])
  encoder_calls = state["intermediates"]["encoder"]["__call__"]
  assert [features.shape[0] for features, _ in encoder_calls] == [16, 16]
  assert [logit.shape for logit in state["intermediates"]["head"]["__call__"]] == [(32, 64)]


def test_resolution_groups_gather_crops_of_one_size_in_order():
  crops = [np.zeros((2, size, size, 1)) for size in (28, 16, 28, 12, 16)]
  assert dino.resolution_groups(crops) == [[0, 2], [1, 4], [3]]


def test_teacher_is_the_scheduled_moving_average_of_the_student(fresh):
  """Three updates (k = 0, 1, 2, as the loop numbers them) of a run of K = 4 steps at m_0 = 0.5, the student's
  parameters moving far each time: the first copies the student, then ``xi <- m_k xi + (1 - m_k) theta`` with
  m_k from numpy; the update count the teacher temperature reads follows the loop's step."""
  config = fresh["config"].copy_and_resolve_references()
  config.method.momentum = 0.5
  method = methods.build_method(config, RunLength(4, 4))
  variables, state = fresh["variables"], fresh["method_state"]
  rng = np.random.default_rng(0)
  students = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), variables["params"])
              for _ in range(3)]
  for k, params in enumerate(students):
    state = method.after_update({**variables, "params": params}, state, np.int32(k))
  m = [1 - (1 - 0.5) * (np.cos(np.pi * k / 4) + 1) / 2 for k in (1, 2)]
  expected = jax.tree.map(lambda t1, t2, t3: m[1] * (m[0] * t1 + (1 - m[0]) * t2) + (1 - m[1]) * t3, *students)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state["teacher"]["params"],
               expected)
  assert int(state["step"]) == 3


def _adam_states(opt_state):
  is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
  return [node for node in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(node)]


def test_last_layer_is_frozen_for_its_epoch_then_trains(fresh):
  """The loop's own step with the recipe's AdamW (weight decay on the prototypes, clipping), 1 epoch = 2 steps:
  during the first 2 steps the last layer neither moves nor decays and AdamW's moments for it stay 0, as
  torch's AdamW leaves a parameter without gradient; from step 3 it trains. Everything else moves at once."""
  config, method, batch = fresh["config"], fresh["method"], fresh["batch"]
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=RUN_LENGTH.steps_per_epoch,
                                        total_steps=RUN_LENGTH.total_steps)
  state = train.init_train_state(method, tx, jax.random.PRNGKey(0), (28, 28, 1))
  state = state.replace(params=nn.unbox(state.params), method_state=nn.unbox(state.method_state),
                        opt_state=nn.unbox(state.opt_state))
  step = jax.jit(train.make_train_step(method, tx, schedules))
  initial = state.params
  for k in range(1, 5):
    state, _ = step(state, batch)
    last_layer = state.params["head"]["last_layer"]
    moments = [adam.mu["head"]["last_layer"] for adam in _adam_states(state.opt_state)]
    moments += [adam.nu["head"]["last_layer"] for adam in _adam_states(state.opt_state)]
    if k <= 2:
      jax.tree.map(np.testing.assert_array_equal, last_layer, initial["head"]["last_layer"])
      assert moments and _max_abs(moments) == 0, k
      assert _max_abs(jax.tree.map(np.subtract, state.params["encoder"], initial["encoder"])) > 0
    else:
      assert _max_abs(jax.tree.map(np.subtract, last_layer, initial["head"]["last_layer"])) > 0, k
      assert _max_abs(moments) > 0, k


def test_collapse_is_flagged_and_the_loop_warns(fresh, monkeypatch):
  """Prototypes all alike make every logit equal: a uniform teacher the student matches (loss = entropy = ln K,
  KL 0), which the method flags; the loop's logger warns about any flagged step."""
  params = fresh["variables"]["params"]
  head = params["head"]
  kernel = np.ones_like(head["last_layer"]["kernel"])
  collapsed = {**params, "head": {**head, "last_layer": {"kernel": kernel}}}
  center = np.zeros_like(fresh["method_state"]["center"])
  (loss, (metrics, _, _)), _ = fresh["value_and_grad"](collapsed, {"params": collapsed}, center)
  np.testing.assert_allclose([loss, metrics["teacher_entropy"]], [np.log(64)] * 2, rtol=1e-5)
  assert float(metrics["collapse"]) == 1.0
  one_hot = losses.DinoLoss(loss=np.float32(1e-3), teacher_entropy=np.float32(1e-3), kl=np.float32(0.0))
  assert float(dino.collapse_flag(one_hot, 64)) == 1.0

  warnings = []
  monkeypatch.setattr(step_metrics.logging, "warning", lambda message, *args: warnings.append(message % args))
  step_metrics.warn_collapse(10, {"loss": 4.2, "collapse": 0.0}, "dino")
  assert not warnings
  step_metrics.warn_collapse(20, {"loss": 4.2, "collapse": 0.25}, "dino")
  assert warnings == ["step 20: collapse: dino flagged 25% of the steps since the last log "
                      "(sslx/methods/dino.py says what it watches)."]


@pytest.mark.parametrize("embed_from", ["teacher", "student"])
def test_embed_reads_the_encoder_embed_from_names(fresh, embed_from):
  config = fresh["config"].copy_and_resolve_references()
  config.method.embed_from = embed_from
  method = methods.build_method(config)
  variables, images = fresh["variables"], fresh["batch"]["view_0"]
  teacher = {"params": jax.tree.map(lambda x: x * 1.5, fresh["method_state"]["teacher"]["params"])}
  source = teacher if embed_from == "teacher" else variables
  _, aux = dino.networks(config)[0].encoder.apply({"params": source["params"]["encoder"]}, images, train=False)
  got = method.embed(variables, {**fresh["method_state"], "teacher": teacher}, images)
  np.testing.assert_allclose(got, aux["pooled"], rtol=1e-5, atol=1e-6)


def test_pictures_are_the_teachers_attention_maps(fresh):
  """`Method.visualize` draws the teacher's class-token maps as `viz.attention_rows` does (the PNG of
  ``python -m sslx.attention_maps``), in the normalised space the loop maps back from."""
  config, method_state = fresh["config"], fresh["method_state"]
  images = fresh["batch"]["view_0"][:2]
  rows = fresh["method"].visualize(fresh["variables"], method_state, {"image": images}, None)
  encoder = dino.networks(config)[1].encoder
  maps = attention_weights.cls_attention_maps(encoder, {"params": method_state["teacher"]["params"]["encoder"]},
                                              images)
  expected = viz.attention_rows(viz.denormalize(images, config.data.mean, config.data.std), np.asarray(maps))
  assert list(rows) == list(expected) == ["image 0", "image 1"]
  for name, row in rows.items():
    np.testing.assert_allclose(viz.denormalize(row, config.data.mean, config.data.std), expected[name], atol=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("method.num_global_crops", 5, r"config\.method\.num_global_crops=5 .*config\.data\.views="),
    ("method.student_temperature", 0.0, r"config\.method\.student_temperature=0\.0 must be a number > 0"),
    ("method.teacher_temperature", -0.07, r"config\.method\.teacher_temperature=-0\.07 must be a number > 0"),
    ("method.warmup_teacher_temperature", 0.0, r"config\.method\.warmup_teacher_temperature=0\.0 must be a number > 0"),
    ("method.momentum", 1.0, r"config\.method\.momentum=1\.0 must be a number in \[0, 1\)"),
    ("method.embed_from", "online", r"config\.method\.embed_from='online' is not one of"),
    ("method.head.out_dim", 0, r"config\.method\.head\.out_dim=0"),
    ("method.freeze_last_layer_epochs", 2.0, r"config\.optimizer\.freeze_epochs=.* must hold .*2\.0\) to match "
                                             r"config\.method\.freeze_last_layer_epochs=2\.0"),
    ("data.views", 1, r"config\.data\.views\[1\] makes 16 px crops but it is one of the "
                      r"config\.method\.num_global_crops=2 global crops"),
    ("data.views", 2, r"config\.data\.views\[2\] makes 14 px crops, not divisible by the patch size 4"),
])
def test_bad_configs_name_the_key(key, value, message):
  config = helpers.tiny_config(CONFIG)
  if key == "data.views":  # value: which view to make bad
    views = list(config.data.views)
    views[value] = recipes_distillation.dino_view(16 if value < 2 else 14, (0.1, 0.4), blur=0.0, grey=True)
    overrides = {key: tuple(views)}
  else:
    overrides = {key: value}
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(helpers.tiny_config(CONFIG, **overrides))


def test_imagenet_recipes():
  small, base = load_config("dino_vits16"), load_config("dino_vitb16")
  for config in (small, base):
    assert (config.batch_size, config.num_epochs, config.data.image_size) == (1024, 100, 224)
    assert (config.model.pos_embed, config.model.drop_path_rate) == ("learned", 0.1)
    opt = config.optimizer
    assert (opt.name, opt.base_lr, opt.lr_batch_base, opt.b1, opt.b2) == ("adamw", 5e-4, 256, 0.9, 0.999)
    assert (opt.weight_decay, opt.weight_decay_end, opt.grad_clip_norm) == (0.04, 0.4, 3.0)
    assert opt.freeze_epochs == ((r"(.*/)?last_layer/.*", 1.0),) and config.method.freeze_last_layer_epochs == 1
    assert (config.schedule.warmup_epochs, config.schedule.min_lr) == (10.0, 1e-6)
    mc = config.method
    assert (mc.num_global_crops, mc.student_temperature, mc.momentum) == (2, 0.1, 0.996)
    assert (mc.warmup_teacher_temperature, mc.teacher_temperature, mc.teacher_temp_warmup_epochs) == (0.04, 0.07, 30)
    assert (mc.head.out_dim, mc.head.hidden_dim, mc.head.bottleneck_dim, mc.head.num_layers) == (65536, 2048, 256, 3)
    views = config.data.views
    assert len(views) == 10 and dino.crop_sizes(config) == [224] * 2 + [96] * 8
    assert views[0].startswith("random_resized_crop(224, scale=(0.4, 1.0), interpolation='bicubic')|hflip"
                               "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)"
                               "|grayscale(p=0.2)|blur(p=1.0")
    assert views[0].endswith("solarize(p=0.0)") and views[1].endswith("|blur(p=0.1, sigma=(0.1, 2.0))|solarize(p=0.2)")
    assert views[2].startswith("random_resized_crop(96, scale=(0.05, 0.4)") and "blur(p=0.5" in views[2]
  assert (small.model.variant, small.method.head.norm_last_layer) == ("S/16", False)
  assert (base.model.variant, base.method.head.norm_last_layer) == ("B/16", True)
  # The released checkpoints' args.txt.
  small, base = load_config("dino_vits16", "published"), load_config("dino_vitb16", "published")
  assert (small.num_epochs, small.optimizer.grad_clip_norm, small.schedule.min_lr) == (800, None, 1e-5)
  assert (base.num_epochs, base.optimizer.base_lr, base.optimizer.grad_clip_norm) == (400, 7.5e-4, 0.3)
  assert (base.schedule.min_lr, base.method.teacher_temp_warmup_epochs) == (2e-6, 50)
  assert base.optimizer.freeze_epochs == ((r"(.*/)?last_layer/.*", 3.0),)
  for config in (small, base):
    assert dino.crop_sizes(config) == [224] * 2 + [96] * 10
    assert "scale=(0.25, 1.0)" in config.data.views[0] and "scale=(0.05, 0.25)" in config.data.views[2]
  assert len(load_config("dino_vits16", "local_crops=6,epochs=300").data.views) == 8
  local = load_config("dino_vits16", "local")
  assert local.batch_size == 8 and dino.crop_sizes(local) == [32, 32, 16, 16]
  assert local.method.head.norm_last_layer is False


def test_cli_run_writes_checkpoints_and_pictures_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in (cli_run / "pictures").iterdir()) == ["step_0000003.png", "step_0000006.png"]
  rows = helpers.rows(cli_run)
  assert {"teacher_entropy", "kl", "teacher_temperature", "collapse"} <= set(rows[1])
  # Through the loop: its first update (k = 0) copies the student, its second (k = 1 of K = 6) averages with
  # m_0 = 0.99 on the schedule.
  first, second = helpers.read_state(cli_run, 1), helpers.read_state(cli_run, 2)
  m = 1 - (1 - 0.99) * (np.cos(np.pi / 6) + 1) / 2
  student_names = [name for name in first if name.startswith("['params']")]
  assert student_names and all(f"['method_state']['teacher']{name}" in first for name in student_names)
  for name in student_names:
    teacher = f"['method_state']['teacher']{name}"
    np.testing.assert_array_equal(first[teacher], first[name], err_msg=name)
    np.testing.assert_allclose(second[teacher], m * first[name] + (1 - m) * second[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)


def test_eight_devices_train_as_one(cli_run, tmp_path):
  """The batch split over 8 devices, crops of two resolutions: the same losses, parameters, optimizer state,
  centre and teacher."""
  helpers.train_on_eight_devices(CONFIG, tmp_path / "eight")
  helpers.assert_same_steps(tmp_path / "eight", cli_run)


def test_evaluation_reads_the_teacher_or_the_student_of_a_run(cli_run):
  """The kNN / linear-probe commands' `restored_run`: the run's teacher by default, its student with
  ``--config.embed_from=student``; a value the method does not know names the key."""
  images = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  embeddings = {}
  for embed_from in (None, "student"):
    run_config, method, (variables, method_state) = eval_run.restored_run(str(cli_run), embed_from=embed_from)
    encoder = dino.networks(run_config)[0].encoder
    source = variables if embed_from == "student" else method_state["teacher"]
    _, aux = encoder.apply({"params": source["params"]["encoder"]}, images, train=False)
    embeddings[embed_from] = np.asarray(method.embed(variables, method_state, images))
    np.testing.assert_allclose(embeddings[embed_from], aux["pooled"], rtol=1e-5, atol=1e-6)
  assert np.abs(embeddings[None] - embeddings["student"]).max() > 1e-4  # after 6 steps they differ
  with pytest.raises(ValueError, match=r"config\.method\.embed_from='online' is not one of"):
    eval_run.restored_run(str(cli_run), embed_from="online")
