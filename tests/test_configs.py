"""The published-recipe configs: they build the published models and run on a TFDS dataset on disk."""
import importlib.util
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sslx import checks
from sslx import methods
from sslx import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def encoder_param_count(config):
  method = methods.build_method(config)
  size = config.data.image_size
  image = jax.ShapeDtypeStruct((1, size, size, config.data.channels), np.float32)
  params = jax.eval_shape(lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]["params"], image)
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params["encoder"]))


def vit_param_formula(width, depth, patch, channels=3):
  """Blocks: qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, two LayerNorms 4D; patch embedding,
  cls token and final norm; the sin-cos position table is fixed, not a parameter."""
  per_block = 12 * width**2 + 13 * width
  return depth * per_block + (patch * patch * channels * width + width) + width + 2 * width


# timm's vit_{base,large}_patch16_224 and vit_huge_patch14_224 parameter counts, which also hold a learned
# position table (with a cls row) and a 1000-class head.
@pytest.mark.parametrize("name, width, depth, patch, timm_count", [
    ("mae_vitb", 768, 12, 16, 86_567_656), ("mae_vitl", 1024, 24, 16, 304_326_632),
    ("mae_vith", 1280, 32, 14, 632_045_800)])
def test_recipe_configs_build_the_published_encoders(name, width, depth, patch, timm_count):
  config = load_config(name)
  assert (config.batch_size, config.num_epochs, config.method.mask_ratio) == (4096, 800, 0.75)
  assert config.optimizer.base_lr == 1.5e-4 and (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.95)
  assert config.data.augment.crop_scale == (0.2, 1.0) and config.data.augment.interpolation == "bicubic"
  assert (config.method.decoder.width, config.method.decoder.depth, config.method.decoder.num_heads) == (512, 8, 16)
  count = encoder_param_count(config)
  assert count == vit_param_formula(width, depth, patch)
  num_tokens = (224 // patch) ** 2 + 1
  assert count + num_tokens * width + (width * 1000 + 1000) == timm_count


def test_vitb_matches_hugging_face_parameter_count():
  transformers = pytest.importorskip("transformers")
  hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig())  # the facebook/vit-mae-base shape
  trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
  config = load_config("mae_vitb")
  method = methods.build_method(config)
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]["params"], image)
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)) == trainable


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="'lokal'"):
    load_config("mae_vitb", "lokal")
  assert load_config("mae_vith", "local").data.image_size % 14 == 0


def test_missing_imagenet_is_a_clear_error(tmp_path):
  config = load_config("mae_vitb", "local")
  config.data.data_dir = str(tmp_path)
  with pytest.raises((FileNotFoundError, ValueError), match="imagenet2012"):
    checks.validate_run_config(config)


class SslxTinyRgb(tfds.core.GeneratorBasedBuilder):
  """24 RGB images of ImageNet-like aspect ratios (40x52 and 52x40), labels 0..3."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(24, 0), "validation": self._generate_examples(8, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      shape = (40, 52, 3) if i % 2 else (52, 40, 3)
      yield i, {"image": Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), "label": i % 4}


def test_local_vitb_recipe_trains_from_a_tfds_array_record_dataset(tmp_path):
  data_dir = str(tmp_path / "tfds")
  SslxTinyRgb(data_dir=data_dir, file_format="array_record").download_and_prepare()
  config = load_config("mae_vitb", "local")
  config.data.update(dict(dataset="sslx_tiny_rgb", data_dir=data_dir))
  config.total_steps = 2
  state, last = train.train(config, str(tmp_path / "run"))
  assert int(state.step) == 2 and np.isfinite(last["loss"])
  assert os.listdir(tmp_path / "run" / "pictures") == ["step_0000002.png"]
