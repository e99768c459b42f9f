"""Fuzzing the run-config validation of the classic pretext methods (rotation, jigsaw, relative position,
context encoders, colorization, split-brain) with `test_config_fuzz`'s machinery: each method's ``:test``
config, ViT and ResNet, with its own keys drawn from plausible and boundary values beside the encoder's and
the generic keys it reads, and the junk every key must survive. A config that validation accepts must get
through an abstract training step; anything else is a gap, to be fixed in the module that owns the key
(mostly the method's ``validate_config``).
"""
import functools

import pytest

from test_colorization import write_image_folder
from test_config_fuzz import _COMMON, _RESNET, _VIT, fuzz
from test_configs import load_config

EXAMPLES_PER_METHOD = 7  # 42 in all
# `test_config_fuzz` draws every generic key on its bases; here only those that the pretext methods read or
# that change what they build (the batch their BatchNorm groups split, the image size their layouts must fit,
# the colour data, the one view, the optimizer's rules over their trees, the probe on their embedding), so
# that the examples go to the methods' own keys. The splits are left out: those of the colour configs' image
# folder are sub-folders, and one it lacks is missing data (a FileNotFoundError by design), not a bad value.
_PRETEXT_COMMON = {key: _COMMON[key] for key in (
    "seed", "batch_size", "data.image_size", "data.channels", "data.mean", "data.std", "data.augmentation",
    "data.augment_on", "optimizer.layer_decay", "optimizer.lr_mults", "optimizer.frozen",
    "monitor.online_probe", "monitor.probe_batch_size")}
_RESNET_PRETEXT = {**_RESNET, "model.bn_groups": (1, 2, 3, 8, 64)}
_ROTATION = {
    "method.hidden_dim": (None, 1, 16, 512),
}
_JIGSAW = {
    "data.image_size": (48, 36, 30, 45, 51, 60),  # 3 x 3 cells of 16, 12, 10, 15, 17, 20 px
    "method.num_permutations": (2, 10, 100, 1, 10_001),
    "method.tile_size": (4, 8, 12, 16, 17, 48),
    "method.channel_jitter": (0, 1, 2, 12),
    "method.tile_dim": (None, 1, 8, 1024),
    "method.hidden_dim": (None, 1, 8, 512),
    "method.dropout": (0.0, 0.5, 0.99, 1.0),
}
_RELPOS = {
    "data.image_size": (56, 40, 50, 64),
    "method.patch_size": (4, 8, 12, 16, 18, 96),
    "method.gap": (0, 1, 6, 48),
    "method.jitter": (0, 1, 3, 7),
    "method.colour": ("none", "drop", "project", "grey"),
    "method.normalize_patches": (True, False),
    "method.head_hidden_dims": ((), (32,), (512, 512), (0,), (8, -4), (2**31,), (True,), (8.0,)),
}
_INPAINTING = {
    "data.image_size": (28, 27, 32, 56, 14),
    "method.region": ("center", "random_blocks", "random"),
    "method.block_size": (1, 2, 4, 7, 8, 14, 28),
    "method.overlap": (0, 1, 4, 14, 100),
    "method.overlap_weight": (1.0, 10.0, 0.5, 1e30),
    "method.adversarial_weight": (0.0, 0.001, 0.5, 0.999),
    "method.discriminator_width": (1, 8, 64),
    "method.decoder_width": (1, 16, 512),
    "method.decoder_upsamples": (1, 2, 3, 5, 40),
}
_COLOUR = {
    "data.image_size": (32, 16, 24, 64),
    "data.augmentation": ("random_resized_crop(32)|hflip", "random_resized_crop(16)", "center_crop(32)"),
    "method.ab_prior": (None, "/no/such/prior.npy"),
    "method.prior_mix": (0.5, 1.0, 1e-6),
    "method.neighbours": (1, 10, 261, 262),
    "method.sigma": (5.0, 1e-3, 1e3),
    "method.grey_threshold": (0.0, 5.0, 200.0),
    "method.temperature": (0.38, 1.0, 1e-3),
}
_COLORIZATION = {**_COLOUR, "method.loss": ("classification", "l2", "smooth_l1", "l1")}
_SPLITBRAIN = {**_COLOUR, "method.l_bins": (2, 50, 256, 100_000)}
# The Fashion-MNIST recipes of the grey pretext tasks: their ``:test`` (ViT) and ``:resnet,test`` configs.
_GREY = {"rotation": _ROTATION, "jigsaw": _JIGSAW, "relpos": _RELPOS, "inpainting": _INPAINTING}
# The colour recipes (RGB image folders): their ``:test`` (ViT) and ``:test,encoder=resnet`` configs.
_RGB = {"colorization": _COLORIZATION, "splitbrain": _SPLITBRAIN}


def _folder_config(name: str, arg: str, *, data_dir: str):
  config = load_config(name, arg)
  config.data.data_dir = data_dir
  return config


def method_bases(method: str, data_dir: str) -> dict:
  """``{base: (make_config, {key: values})}`` of one pretext ``method``, on the ViT and on the ResNet; the
  colour methods read the image folder ``data_dir``."""
  if method in _GREY:
    name, args, make = f"{method}_fashion_mnist", ("test", "resnet,test"), load_config
  else:
    name, args = f"{method}_folder", ("test", "test,encoder=resnet")
    make = functools.partial(_folder_config, data_dir=data_dir)
  keys = {**_GREY, **_RGB}[method]
  vit, resnet = (functools.partial(make, name, arg) for arg in args)
  return {method: (vit, {**_PRETEXT_COMMON, **_VIT, **keys}),
          f"{method}_resnet": (resnet, {**_PRETEXT_COMMON, **_RESNET_PRETEXT, **keys})}


# One fuzz per method, so that each gets its share of the examples.
@pytest.mark.parametrize("method", [*_GREY, *_RGB])
def test_pretext_validation_accepts_or_names_a_key(method, tmp_path):
  fuzz(method_bases(method, write_image_folder(tmp_path, count=2)), EXAMPLES_PER_METHOD)
