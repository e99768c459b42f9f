"""ResNet encoders against torchvision's layout: parameter counts, converted weights in eval and train mode, the
stems and initialisation options, and one train step on 1 device and on 8 (fake CPU) devices."""
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util

import torch_resnet
from sslx.convert import torchvision_resnet
from sslx.models import resnet
from multiprocess_helpers import REPO, cpu_env



def _torchvision_resnet():
  """The torchvision-layout PyTorch peer (tests/torch_resnet.py says why it is not torchvision itself)."""
  return torch_resnet


def _config(variant, **overrides):
  config = resnet.default_config(variant)
  config.update({"dtype": "float32", **overrides})
  return config


def _torch_resnet(variant: str, small_images: bool = False, seed: int = 0):
  """torchvision's ResNet without its classifier, every weight, BN affine and BN running stat random."""
  torch.manual_seed(seed)
  model = getattr(_torchvision_resnet(), f"resnet{variant}")(weights=None)
  model.fc = torch.nn.Identity()
  if small_images:
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """Random NCHW float32 images (torch's layout)."""
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _assert_close(actual, expected, rtol):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _abstract_variables(model, size=32):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jnp.zeros((1, size, size, 3)))


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant,expected", [("18", 11_176_512), ("34", None), ("50", 23_508_032)])
def test_parameters_and_tree_match_torchvision(variant, expected):
  torch_model = getattr(_torchvision_resnet(), f"resnet{variant}")(weights=None)
  torch_count = sum(p.numel() for name, p in torch_model.named_parameters() if not name.startswith("fc."))
  abstract = nn.unbox(_abstract_variables(resnet.from_config(_config(variant))))
  assert _count(abstract["params"]) == torch_count
  if expected is not None:
    assert torch_count == expected
  # The converter fills exactly the model's tree, shape for shape.
  converted = torchvision_resnet.variables_from_torchvision(torch_model.state_dict())
  shapes = jax.tree.map(lambda x: x.shape, converted)
  assert shapes == jax.tree.map(lambda x: x.shape, abstract)
  assert torchvision_resnet.variant_from_torchvision(torch_model.state_dict()) == variant


@pytest.mark.parametrize("variant", ["18", "50"])
def test_output_contract_and_dtypes(variant):
  model = resnet.from_config(_config(variant, dtype="bfloat16"))
  abstract = _abstract_variables(model)
  features, aux = jax.eval_shape(functools.partial(model.apply, train=False), abstract, jnp.zeros((2, 32, 32, 3)))
  assert features.shape == (2, resnet.feature_dim(_config(variant))) and features.dtype == jnp.float32
  assert aux.keys() == {"pooled", "feature_map"} and aux["pooled"].shape == features.shape
  # The last feature map that `pooled` averages: 32 px / 32 (stem 4, three stride-2 stages) = 1 x 1.
  assert aux["feature_map"].shape == (2, 1, 1, features.shape[1]) and aux["feature_map"].dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  names = {tuple(box.names) for box in jax.tree.leaves(abstract["params"],
                                                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
  assert names == {resnet.CONV_AXES, resnet.CHANNEL_AXES}


@pytest.mark.parametrize("variant,small_images,size", [("18", False, 64), ("50", False, 32), ("18", True, 32)])
def test_converted_torchvision_weights_give_the_same_eval_features(variant, small_images, size):
  torch_model = _torch_resnet(variant, small_images).eval()
  images = _images(2, size)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(images)).numpy()
  # numpy values convert as torch tensors do.
  state_dict = {key: value.numpy() for key, value in torch_model.state_dict().items()}
  variables = torchvision_resnet.variables_from_torchvision(state_dict)
  model = resnet.from_config(_config(variant, small_images=small_images))
  features, aux = jax.jit(functools.partial(model.apply, train=False))(variables, images.transpose(0, 2, 3, 1))
  _assert_close(features, expected, 1e-4)
  np.testing.assert_array_equal(aux["pooled"], features)


def test_train_mode_uses_batch_statistics_and_updates_running_averages_as_torch():
  # Batch 4 of 16 px leaves n = 4 * 2 * 2 = 16 values per channel in the last stage, where the unbiased
  # running variance is 16/15 of flax's biased one: the comparison tells them apart.
  torch_model = _torch_resnet("18", small_images=True, seed=1)
  variables = torchvision_resnet.variables_from_torchvision(torch_model.state_dict())
  images = _images(4, 16, seed=1)
  expected = torch_model.train()(torch.from_numpy(images)).detach().numpy()
  expected_stats = torchvision_resnet.variables_from_torchvision(torch_model.state_dict())["batch_stats"]

  model = resnet.from_config(_config("18", small_images=True))
  (features, _), updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images.transpose(0, 2, 3, 1))
  _assert_close(features, expected, 1e-4)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(expected_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), updates["batch_stats"],
               expected_stats)


def test_running_variance_is_unbiased_unlike_flax_batch_norm():
  x = np.random.default_rng(2).normal(size=(2, 3, 1, 4)).astype(np.float32)
  n = 2 * 3 * 1
  biased = x.reshape(n, 4).var(axis=0)
  ours = resnet.BatchNorm()
  _, updates = ours.apply(ours.init(jax.random.PRNGKey(0), x, train=False), x, train=True,
                          mutable=["batch_stats"])
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x.reshape(n, 4).mean(axis=0), atol=1e-7)
  # flax's own BatchNorm keeps the biased variance: documented here so a change in flax is noticed.
  theirs = nn.BatchNorm(momentum=0.9, use_running_average=False)
  _, updates = theirs.apply(theirs.init(jax.random.PRNGKey(0), x), x, mutable=["batch_stats"])
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * biased, rtol=1e-6)


def test_ghost_batch_norm_normalises_each_group_by_its_own_statistics():
  # Rows of growing scale, so that every group's statistics differ.
  x = np.random.default_rng(3).normal(size=(6, 2, 2, 4)).astype(np.float32)
  x *= np.arange(1, 7, dtype=np.float32)[:, None, None, None]
  grouped, whole = resnet.BatchNorm(groups=3), resnet.BatchNorm()
  variables = whole.init(jax.random.PRNGKey(0), x, train=False)
  out, updates = grouped.apply(variables, x, train=True, mutable=["batch_stats"])
  parts = [whole.apply(variables, x[i:i + 2], train=True, mutable=["batch_stats"]) for i in (0, 2, 4)]
  np.testing.assert_allclose(out, np.concatenate([part for part, _ in parts]), rtol=1e-5, atol=1e-6)
  for name in ("mean", "var"):  # the mean of the three groups' own updates
    expected = np.mean([stats["batch_stats"][name] for _, stats in parts], axis=0)
    np.testing.assert_allclose(updates["batch_stats"][name], expected, rtol=1e-6)
  in_eval = [model.apply(variables, x, train=False) for model in (grouped, whole)]
  np.testing.assert_array_equal(*in_eval)  # evaluation reads the running averages, whatever the groups
  with pytest.raises(ValueError, match="a batch of 6 rows cannot be split into 4 BatchNorm groups"):
    resnet.BatchNorm(groups=4).apply(variables, x, train=True, mutable=["batch_stats"])


def test_scale_only_batch_norm_has_no_bias():
  x = np.random.default_rng(4).normal(size=(8, 3)).astype(np.float32) + 5
  variables = resnet.BatchNorm(use_bias=False).init(jax.random.PRNGKey(0), x, train=False)
  assert set(variables["params"]) == {"scale"}
  out, _ = resnet.BatchNorm(use_bias=False).apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)


@pytest.mark.parametrize("bottleneck,last_bn", [(False, "bn2"), (True, "bn3")])
def test_zero_init_last_bn_zeroes_the_last_scale_of_every_block_only(bottleneck, last_bn):
  assert resnet.from_config(_config("50", zero_init_last_bn=True)).zero_init_last_bn
  # One block per stage walks the same code as the full variants at a fraction of the compile time.
  model = resnet.ResNet((1, 2, 1, 1), bottleneck, zero_init_last_bn=True)
  params = nn.unbox(jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0),
                                                                        jnp.zeros((1, 8, 8, 3)))["params"])
  blocks = [name for name in params if name.startswith("stage")]
  assert len(blocks) == 5
  scales = {path[:-1]: leaf for path, leaf in traverse_util.flatten_dict(params).items()
            if path[-1] == "scale"}
  assert len(scales) == 1 + sum(len(params[block]) // 2 for block in blocks)
  for path, scale in scales.items():
    zero = path[0] in blocks and path[1] == last_bn
    np.testing.assert_array_equal(scale, 0.0 if zero else 1.0, err_msg=str(path))
  # Kaiming-normal, fan_out: std sqrt(2 / (3 * 3 * 512)) for the last 3x3 convolution.
  kernel = params["stage4_block0"]["conv2"]["kernel"]
  assert abs(np.std(kernel) / np.sqrt(2 / (9 * kernel.shape[-1])) - 1) < 0.02


@pytest.mark.parametrize("small_images,stem_kernel,stem_size,stage1_size", [(True, 3, 32, 32), (False, 7, 16, 8)])
def test_small_image_stem_has_stride_one_and_no_max_pool(small_images, stem_kernel, stem_size, stage1_size):
  model = resnet.from_config(_config("18", small_images=small_images))
  abstract = _abstract_variables(model)
  assert nn.unbox(abstract)["params"]["stem_conv"]["kernel"].shape == (stem_kernel, stem_kernel, 3, 64)
  _, state = jax.eval_shape(functools.partial(model.apply, train=False, capture_intermediates=True,
                                              mutable=["intermediates"]), abstract, jnp.zeros((1, 32, 32, 3)))
  outputs = state["intermediates"]
  assert outputs["stem_conv"]["__call__"][0].shape == (1, stem_size, stem_size, 64)
  assert outputs["stage1_block0"]["__call__"][0].shape == (1, stage1_size, stage1_size, 64)


_SHARDED_STEP = """
import functools, sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from sslx.models import resnet

assert jax.device_count() == 8, jax.devices()
model = resnet.from_config(ml_collections.ConfigDict(dict(variant="18", small_images=True, width=8, dtype="float32")))
images = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
target = jax.random.normal(jax.random.PRNGKey(1), (8, 64))  # width 8: 8 x 8 features
variables = nn.unbox(jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(2), images[:1]))

def step(params, batch_stats, images, target):
  def loss_fn(params):
    (features, _), updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                         mutable=["batch_stats"])
    return jnp.mean(jnp.square(features - target)), updates["batch_stats"]
  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return dict(loss=loss, grads=grads, batch_stats=new_stats)

args = (variables["params"], variables["batch_stats"], images, target)
single = jax.jit(step)(*jax.device_put(args, jax.devices()[0]))
mesh = jax.make_mesh((8,), ("data",))
split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
sharded_args = jax.device_put(args, (replicated, replicated, split, split))
assert sharded_args[2].addressable_shards[0].data.shape == (1, 16, 16, 3)
sharded = jax.jit(step)(*sharded_args)
flat = lambda tree: {jax.tree_util.keystr(path): np.asarray(leaf)
                     for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
np.savez(sys.argv[1], **{"single" + key: value for key, value in flat(single).items()},
         **{"sharded" + key: value for key, value in flat(sharded).items()})
"""


def test_train_step_on_8_devices_matches_1_device(tmp_path):
  out = tmp_path / "results.npz"
  result = subprocess.run([sys.executable, "-c", _SHARDED_STEP, str(out)], env=cpu_env(8), cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = dict(np.load(out))
  single = {key[len("single"):]: value for key, value in results.items() if key.startswith("single")}
  assert len(single) > 100 and any("grads" in key for key in single)
  for key, value in single.items():
    # Sums over the batch run in another order on 8 devices: float32 rounding, relative to each leaf.
    np.testing.assert_allclose(results["sharded" + key], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(),
                               err_msg=key)


def test_bad_config_names_the_key():
  with pytest.raises(ValueError, match=r"config.model.variant='19' is not one of \('10', '18', '34', '50'"):
    resnet.from_config(_config("19"))
  with pytest.raises(ValueError, match=r"config.model.variant='resnet50'"):
    resnet.validate_config(_config("resnet50"), 224)
  with pytest.raises(ValueError, match=r"config.model.pooling='cls'"):
    resnet.validate_config(_config("50", pooling="cls"), 224)
  with pytest.raises(ValueError, match=r"config.model.dtype"):
    resnet.validate_config(_config("50", dtype="float64"), 224)
  with pytest.raises(ValueError, match=r"config.model.bn_groups=0"):
    resnet.validate_config(_config("50", bn_groups=0), 224)
  resnet.validate_config(_config("50"), 224)
  assert resnet.from_config(_config("18", bn_groups=8)).bn_groups == 8


def test_converter_rejects_keys_of_other_models():
  with pytest.raises(ValueError, match=r"Unexpected key 'layer1.0.attn.weight'"):
    torchvision_resnet.variables_from_torchvision({"layer1.0.attn.weight": np.zeros((4, 4))})
  with pytest.raises(ValueError, match=r"Unexpected key 'head.weight'"):
    torchvision_resnet.variables_from_torchvision({"head.weight": np.zeros((4, 4))})
