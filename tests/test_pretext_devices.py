"""The pretext methods (rotation, jigsaw, relpos, inpainting, colorization, split-brain, video colourisation):
one training step's loss, gradients and model state on 1 device and with the batch split over 8 fake CPU
devices (`sharded_gradients.assert_devices_agree`), each with the ViT, and with the ResNet where BatchNorm
normalises a batch the method builds from the images (rotation's 4B turns, jigsaw's 9B tiles, relpos's 2B
patches). All of them run in one child process (``python tests/test_pretext_devices.py``) under 8 fake
devices, with FSDP 4: the batch split over all 8 devices, the parameters over 4 of them. With the ResNet,
every method's parameters must also split under FSDP 4 (checked on shapes alone, in this process).
"""
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import contrastive_helpers as helpers
from sharded_gradients import assert_devices_agree
from sslx import methods
from sslx import models
from sslx import parallel

FSDP = 4
# A ResNet's float32 gradients are only accurate to ~1e-6 of the largest one, on 1 device as on 8, which is the
# helper's tolerance: against a float64 pass of the same step, the stem kernel's gradient was off by up to
# 0.9e-6 (1 device) and 1.3e-6 (8) of it here, and by 2.1e-6 and 3.0e-6 with a ResNet-18 (relpos), where 1
# and 8 devices then differed by 3.3e-6 (BatchNorm's backward subtracts batch means that cancel most of each
# sum). A sharding error (statistics of one device's rows, a wrong reshape) is orders of magnitude larger.
# ReLU kinks: an input within rounding of 0 flips its gradient on one side only (a ResNet-18 on 16 px turns:
# 8.5e-3 of the largest gradient). On these batches the 1-device gradients move by under 5e-6 of it when the
# images move by 1e-6, so no ReLU input is that close.
RESNET_GRAD_ATOL = 1e-5
JIGSAW = {"data.image_size": 30, "method.tile_size": 8, "method.num_permutations": 10}
RELPOS = {"data.image_size": 32, "method.patch_size": 8, "method.gap": 2, "method.jitter": 1}
# method: (config, its overrides, the batch's (B, H, W, C) images or (B, T, H, W, C) frames).
METHODS = {
    "rotation": ("rotation_fashion_mnist", {"data.image_size": 8}, (8, 8, 8, 1)),
    "jigsaw": ("jigsaw_fashion_mnist", JIGSAW, (8, 30, 30, 1)),
    "relpos": ("relpos_fashion_mnist", RELPOS, (8, 32, 32, 1)),
    # With the adversarial loss: the discriminator and its stop-gradients go through the check too.
    "inpainting": ("inpainting_fashion_mnist",
                   {"data.image_size": 16, "method.block_size": 4, "method.adversarial_weight": 0.1},
                   (8, 16, 16, 1)),
    "colorization": ("colorization_folder", {"data.image_size": 16}, (8, 16, 16, 3)),
    "splitbrain": ("splitbrain_folder", {"data.image_size": 16}, (8, 16, 16, 3)),
    "video_colorization": ("video_colorization_synthetic", {}, (8, 4, 16, 16, 3)),
}
CASES = [(method, "vit") for method in METHODS] + [(method, "resnet") for method in ("rotation", "jigsaw", "relpos")]


def case_config(method, encoder):
  """The ``:test`` config of ``method`` with its overrides; ``encoder='resnet'`` swaps in a ResNet-10 of width
  8 with the small-image stem. Validated, so the overrides are ones a run accepts."""
  config_name, overrides, _ = METHODS[method]
  config = helpers.tiny_config(config_name, **overrides)
  if encoder == "resnet":
    config.model = models.default_config("resnet", variant="10", small_images=True, width=8)
  methods.method_module(config.method.name).validate_config(config)
  return config


def check_case(method, encoder):
  """`assert_devices_agree` for ``method`` with ``encoder`` on Gaussian-noise images (or frames)."""
  shape = METHODS[method][2]
  built = methods.build_method(case_config(method, encoder))
  pixels = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  grad_atol = RESNET_GRAD_ATOL if encoder == "resnet" else 1e-6
  if len(shape) == 5:  # video: `init` takes one frame as an image, `loss_fn` the clips
    assert_devices_agree(built, {"frames": pixels}, jax.random.PRNGKey(3), (FSDP,),
                         example={"image": pixels[:1, 0]}, grad_atol=grad_atol)
  else:
    assert_devices_agree(built, pixels, jax.random.PRNGKey(3), (FSDP,), grad_atol=grad_atol)


def main():
  """Every case, reporting ``name: ok`` or ``name: failed: ...`` so one failure does not hide the others."""
  assert jax.device_count() == 8, jax.devices()
  for method, encoder in CASES:
    name = f"{method}_{encoder}"
    try:
      check_case(method, encoder)
    except Exception as error:  # any failure, reported per case; the test fails on it
      print(f"{name}: failed: {type(error).__name__}: {error}", flush=True)
    else:
      print(f"{name}: ok", flush=True)


@pytest.fixture(scope="module")
def eight_device_report():
  result = subprocess.run([sys.executable, __file__], env=helpers.env(8), cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.parametrize("method, encoder", CASES)
def test_eight_devices_give_the_loss_and_gradients_of_one(eight_device_report, method, encoder):
  name = f"{method}_{encoder}"
  lines = [line for line in eight_device_report.splitlines() if line.startswith(f"{name}: ")]
  assert lines == [f"{name}: ok"], "\n".join(lines) or eight_device_report[-3000:]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_parameter_splits_under_fsdp_with_the_resnet(method):
  """Each parameter's shard under FSDP 4 on a (2, 4) mesh: an axis FSDP splits must divide by 4 (the pixel
  channels of inpainting's decoder did not)."""
  config = case_config(method, "resnet")
  shape = METHODS[method][2]
  image = jax.ShapeDtypeStruct((1, *shape[-3:]), np.float32)
  abstract = jax.eval_shape(lambda x: methods.build_method(config).init(jax.random.PRNGKey(0), {"image": x}), image)
  mesh = AbstractMesh((8 // FSDP, FSDP), parallel.DATA_AXES)
  shardings = parallel.shardings_from_logical(abstract, mesh, parallel.logical_axis_rules(FSDP))
  leaves = jax.tree.leaves(nn.unbox(abstract))
  # `shard_shape` raises for an axis that does not divide.
  split = [sharding.shard_shape(leaf.shape) != leaf.shape
           for sharding, leaf in zip(jax.tree.leaves(shardings), leaves, strict=True)]
  assert any(split)  # FSDP does split something (the encoder's convolutions)


if __name__ == "__main__":
  main()
