"""sslx MAE against Hugging Face ``ViTMAEForPreTraining`` with ported weights (PyTorch, CPU, float32)."""
import json
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.vit_mae import modeling_vit_mae  # pylint: disable=g-import-not-at-top

from sslx import losses
from sslx.convert import hf_mae
from sslx.convert import scan_layout
from sslx.methods import mae
from sslx.models import pos_embed
from sslx.models.patches import patchify

_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=2,
              decoder_num_attention_heads=4, decoder_intermediate_size=64)
_GRID = 4


def _hf_sincos(dim):
  """The table HF writes into pretrained models: its builder with the two halves swapped."""
  table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(_GRID, _GRID, dim, cls_token=True)
  return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=1)


def _hf_model(seed=0, random_pos=False, **config):
  """A model with every weight random except the fixed sincos tables (unless ``random_pos``)."""
  model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**{**_SIZES, **config})).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator) * 0.2
      param.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    if not random_pos:
      model.vit.embeddings.position_embeddings.copy_(_hf_sincos(64)[None])
    model.decoder.decoder_pos_embed.copy_(_hf_sincos(32)[None])
  return model


def _sslx_model(values, pos_embed="sincos", scan_blocks=False):
  """The sslx module built through the config path a user takes with ``config_from_hf`` values."""
  config = ml_collections.ConfigDict(dict(
      model=dict(variant=f"B/{values['patch_size']}", width=values["width"], depth=values["depth"],
                 num_heads=values["num_heads"], mlp_dim=values["mlp_dim"], pos_embed=pos_embed,
                 layer_norm_eps=values["layer_norm_eps"], dtype="float32", scan_blocks=scan_blocks),
      method=dict(name="mae", mask_ratio=values["mask_ratio"], norm_pix_loss=values["norm_pix_loss"],
                  decoder=dict(width=values["decoder_width"], depth=values["decoder_depth"],
                               num_heads=values["decoder_num_heads"], mlp_dim=values["decoder_mlp_dim"])),
      data=dict(image_size=values["image_size"], channels=values["channels"])))
  return mae.model_from_config(config)


def _max_diffs(hf_model, params, model, seed=0):
  rng = np.random.RandomState(seed)
  pixels = rng.randn(2, 3, 32, 32).astype(np.float32)
  noise = rng.rand(2, _GRID * _GRID).astype(np.float32)
  with torch.no_grad():
    ref = hf_model(pixel_values=torch.from_numpy(pixels), noise=torch.from_numpy(noise))
  images = pixels.transpose(0, 2, 3, 1)
  out = model.apply({"params": params}, images, train=False, noise=noise)
  loss = losses.masked_reconstruction_loss(out["pred"], patchify(images, 8), out["mask"],
                                           norm_pix=hf_model.config.norm_pix_loss)
  np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
  np.testing.assert_array_equal(np.asarray(out["ids_restore"]), ref.ids_restore.numpy())
  return (float(np.max(np.abs(np.asarray(out["pred"]) - ref.logits.numpy()))),
          abs(float(loss) - float(ref.loss)))


@pytest.mark.parametrize("norm_pix,eps", [(True, 1e-6), (False, 1e-6), (True, None)])
def test_logits_and_loss_match_hf(norm_pix, eps):
  config = dict(norm_pix_loss=norm_pix) if eps is None else dict(norm_pix_loss=norm_pix, layer_norm_eps=eps)
  hf_model = _hf_model(**config)
  values = hf_mae.config_from_hf(hf_model.config)
  assert values["layer_norm_eps"] == (1e-12 if eps is None else eps)
  assert values["norm_pix_loss"] == norm_pix
  params = hf_mae.convert_hf_vitmae(hf_model.state_dict(), hf_model.config)
  logits_diff, loss_diff = _max_diffs(hf_model, params, _sslx_model(values))
  assert logits_diff < 1e-5 and loss_diff < 1e-5


def test_scanned_blocks_match_hf_after_stacking():
  """config.model.scan_blocks: convert, then stack the encoder's and decoder's blocks."""
  hf_model = _hf_model(norm_pix_loss=True)
  values = hf_mae.config_from_hf(hf_model.config)
  params = scan_layout.stack_blocks(hf_mae.convert_hf_vitmae(hf_model.state_dict(), hf_model.config))
  assert "blocks" in params["encoder"] and "blocks" in params["decoder"]
  logits_diff, loss_diff = _max_diffs(hf_model, params, _sslx_model(values, scan_blocks=True))
  assert logits_diff < 1e-5 and loss_diff < 1e-5


def test_learned_position_table_is_ported():
  hf_model = _hf_model(random_pos=True)
  with pytest.raises(ValueError, match="position_embeddings"):
    hf_mae.convert_hf_vitmae(hf_model.state_dict(), hf_model.config)
  params = hf_mae.convert_hf_vitmae(hf_model.state_dict(), hf_model.config, pos_embed="learned")
  values = hf_mae.config_from_hf(hf_model.config)
  logits_diff, loss_diff = _max_diffs(hf_model, params, _sslx_model(values, pos_embed="learned"))
  assert logits_diff < 1e-5 and loss_diff < 1e-5


def test_converted_tree_matches_init_tree():
  hf_model = _hf_model()
  values = hf_mae.config_from_hf(hf_model.config)
  params = hf_mae.convert_hf_vitmae(hf_model.state_dict(), hf_model.config)
  model = _sslx_model(values)
  init = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                                            np.zeros((1, 32, 32, 3), np.float32), train=False))["params"]
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, nn.unbox(tree))
  assert shapes(params) == shapes(init)


def test_hub_checkpoint_names_convert_the_same():
  hf_model = _hf_model()
  hub_names = {}
  for key, value in hf_model.state_dict().items():
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    key = key.replace(".attention.q_proj.", ".attention.attention.query.")
    key = key.replace(".attention.k_proj.", ".attention.attention.key.")
    key = key.replace(".attention.v_proj.", ".attention.attention.value.")
    key = key.replace(".attention.o_proj.", ".attention.output.dense.")
    key = key.replace(".mlp.fc1.", ".intermediate.dense.").replace(".mlp.fc2.", ".output.dense.")
    hub_names[key] = value.numpy()
  # Names as in the facebook/vit-mae-* checkpoints on the Hub.
  assert "vit.encoder.layer.1.attention.attention.query.weight" in hub_names
  assert "decoder.decoder_layers.0.intermediate.dense.bias" in hub_names
  expected = hf_mae.convert_hf_vitmae(hf_model.state_dict(), hf_model.config)
  converted = hf_mae.convert_hf_vitmae(hub_names, hf_model.config.to_dict())
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, expected)


@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_load_from_save_pretrained_directory(tmp_path, shard_size):
  hf_model = _hf_model(norm_pix_loss=True)
  kwargs = {} if shard_size is None else dict(max_shard_size=shard_size)
  hf_model.save_pretrained(tmp_path, **kwargs)
  assert (tmp_path / "model.safetensors").exists() == (shard_size is None)
  params, values = hf_mae.load_hf_vitmae(tmp_path)
  assert values == hf_mae.config_from_hf(hf_model.config)
  logits_diff, loss_diff = _max_diffs(hf_model, params, _sslx_model(values))
  assert logits_diff < 1e-5 and loss_diff < 1e-5


def test_load_rejects_directory_without_safetensors(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_SIZES))
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
    hf_mae.load_hf_vitmae(tmp_path)


def test_conversion_errors_name_the_key():
  hf_model = _hf_model()
  convert = lambda sd: hf_mae.convert_hf_vitmae(sd, hf_model.config)
  state = hf_model.state_dict()
  del state["vit.layernorm.bias"]
  with pytest.raises(ValueError, match=r"'vit\.layernorm\.bias' is missing"):
    convert(state)
  state = hf_model.state_dict()
  state["decoder.extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match=r"decoder\.extra\.weight"):
    convert(state)
  state = hf_model.state_dict()
  state["decoder.decoder_pred.bias"] = torch.zeros(5)
  with pytest.raises(ValueError, match=r"'decoder\.decoder_pred\.bias' has shape \(5,\)"):
    convert(state)
  with pytest.raises(ValueError, match="hidden_act"):
    hf_mae.config_from_hf(dict(_SIZES, hidden_act="relu"))


def test_sincos_and_patchify_match_hf():
  np.testing.assert_allclose(pos_embed.sincos_pos_embed_2d(64, _GRID, cls_token=True), _hf_sincos(64).numpy(),
                             atol=1e-6)
  hf_model = _hf_model()
  pixels = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(patchify(pixels.transpose(0, 2, 3, 1), 8)),
                                hf_model.patchify(torch.from_numpy(pixels)).numpy())
