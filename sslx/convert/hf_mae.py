"""Port Hugging Face ``ViTMAEForPreTraining`` weights into sslx's MAE parameter tree.

Works without PyTorch: tensors may be numpy arrays or anything ``np.asarray`` or ``.numpy()`` accepts.
Both weight-naming schemes are read: the one of Hub checkpoints and transformers 4.x
(``vit.encoder.layer.N.attention.attention.query``, ``intermediate.dense`` ...) and the one of
transformers 5.x modules (``vit.layers.N.attention.q_proj``, ``mlp.fc1`` ...).

Typical use::

  params, values = load_hf_vitmae("/path/to/vit-mae-base")   # a save_pretrained directory
  # values["width"], values["decoder_depth"], ... fill config.model / config.method / config.data.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from sslx.models import pos_embed as pos_embed_lib


# Hugging Face ViTMAEConfig defaults, used for keys a config.json leaves out (as transformers does).
_HF_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
    qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
    decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75,
    norm_pix_loss=False)

# Older names -> transformers 5.x names. `attention.output.dense` must be renamed before `output.dense`.
_RENAMES = (
    (r"^vit\.encoder\.layer\.(\d+)\.", r"vit.layers.\1."),
    # transformers 5.x save_pretrained writes decoder layers under this name.
    (r"^decoder\.decoder_encoder\.layer\.(\d+)\.", r"decoder.decoder_layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"sslx supports square {name} only, got {value}.")
    value = value[0]
  return int(value)


def config_from_hf(hf_config) -> dict:
  """sslx configuration values of a ``ViTMAEConfig`` (an object with ``to_dict()`` or a mapping).

  Returns:
    dict with ``width``, ``depth``, ``num_heads``, ``mlp_dim``, ``patch_size``, ``image_size``,
    ``channels``, ``layer_norm_eps``, ``decoder_width``, ``decoder_depth``, ``decoder_num_heads``,
    ``decoder_mlp_dim``, ``mask_ratio`` and ``norm_pix_loss``.
  """
  raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  cfg = {**_HF_DEFAULTS, **raw}
  if cfg.get("model_type", "vit_mae") != "vit_mae":
    raise ValueError(f"Expected a vit_mae config, got model_type={cfg['model_type']!r}.")
  if cfg["hidden_act"] != "gelu":
    raise ValueError(f"sslx ViTs use exact GELU; hidden_act={cfg['hidden_act']!r} is not supported.")
  if not cfg["qkv_bias"]:
    raise ValueError("sslx ViTs have a qkv bias; qkv_bias=False is not supported.")
  return dict(
      width=int(cfg["hidden_size"]), depth=int(cfg["num_hidden_layers"]),
      num_heads=int(cfg["num_attention_heads"]), mlp_dim=int(cfg["intermediate_size"]),
      patch_size=_square(cfg["patch_size"], "patch_size"),
      image_size=_square(cfg["image_size"], "image_size"),
      channels=int(cfg["num_channels"]), layer_norm_eps=float(cfg["layer_norm_eps"]),
      decoder_width=int(cfg["decoder_hidden_size"]), decoder_depth=int(cfg["decoder_num_hidden_layers"]),
      decoder_num_heads=int(cfg["decoder_num_attention_heads"]),
      decoder_mlp_dim=int(cfg["decoder_intermediate_size"]),
      mask_ratio=float(cfg["mask_ratio"]), norm_pix_loss=bool(cfg["norm_pix_loss"]))


class _Weights:
  """The state dict under canonical names; hands each tensor out once, checking its shape."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self._items = {}
    for key, value in state_dict.items():
      name = key
      for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
      self._items[name] = (key, value)

  def take(self, name: str, shape) -> np.ndarray:
    if name not in self._items:
      raise ValueError(f"Hugging Face ViTMAE weight {name!r} is missing from the state dict.")
    key, value = self._items.pop(name)
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float32)
    if array.shape != tuple(shape):
      raise ValueError(f"Hugging Face weight {key!r} has shape {array.shape}; expected {tuple(shape)}.")
    return array

  def check_all_taken(self):
    if self._items:
      raise ValueError(f"Unexpected Hugging Face weights: {sorted(k for k, _ in self._items.values())}.")


def _linear(w: _Weights, prefix: str, d_in: int, d_out: int) -> dict:
  return dict(kernel=w.take(f"{prefix}.weight", (d_out, d_in)).T, bias=w.take(f"{prefix}.bias", (d_out,)))


def _norm(w: _Weights, prefix: str, width: int) -> dict:
  return dict(scale=w.take(f"{prefix}.weight", (width,)), bias=w.take(f"{prefix}.bias", (width,)))


def _block(w: _Weights, prefix: str, width: int, mlp_dim: int) -> dict:
  qkv = [_linear(w, f"{prefix}.attention.{n}_proj", width, width) for n in "qkv"]
  proj = _linear(w, f"{prefix}.attention.o_proj", width, width)
  return dict(
      norm1=_norm(w, f"{prefix}.layernorm_before", width),
      attn=dict(
          qkv=dict(kernel=np.concatenate([t["kernel"] for t in qkv], axis=1),
                   bias=np.concatenate([t["bias"] for t in qkv])),
          proj=proj),
      norm2=_norm(w, f"{prefix}.layernorm_after", width),
      mlp=dict(fc1=_linear(w, f"{prefix}.mlp.fc1", width, mlp_dim),
               fc2=_linear(w, f"{prefix}.mlp.fc2", mlp_dim, width)))


def _check_sincos(table: np.ndarray, expected: np.ndarray, key: str, hint: str):
  diff = float(np.max(np.abs(table - expected)))
  if diff > 1e-4:
    raise ValueError(f"{key} is not the fixed sine-cosine table sslx uses (max abs difference {diff:.3g}). "
                     f"{hint}")


def convert_hf_vitmae(state_dict: Mapping[str, Any], hf_config, *, pos_embed: str = "sincos") -> dict:
  """Maps a ``ViTMAEForPreTraining`` state dict onto the sslx MAE parameter tree.

  Args:
    state_dict: name -> tensor; either naming scheme (see module docstring).
    hf_config: the model's ``ViTMAEConfig`` or its dict (``config.json``); gives head counts and sizes.
    pos_embed: ``'sincos'`` checks that the encoder position table is the fixed one sslx computes;
      ``'learned'`` keeps it as the ``encoder/pos_embed`` parameter (for ``config.model.pos_embed``).

  Returns:
    ``{'encoder': ..., 'decoder': ...}`` of float32 numpy arrays, the unboxed ``params`` of
    ``sslx.methods.mae.MaskedAutoencoder``.
  """
  if pos_embed not in ("sincos", "learned"):
    raise ValueError(f"Unknown pos_embed {pos_embed!r}; choose 'sincos' or 'learned'.")
  c = config_from_hf(hf_config)
  w = _Weights(state_dict)
  width, dec_width, p = c["width"], c["decoder_width"], c["patch_size"]
  grid = c["image_size"] // p
  num_patches = grid * grid

  conv = w.take("vit.embeddings.patch_embeddings.projection.weight", (width, c["channels"], p, p))
  encoder = dict(patch_embed=dict(kernel=conv.transpose(2, 3, 1, 0),
                                  bias=w.take("vit.embeddings.patch_embeddings.projection.bias", (width,))))
  pos = w.take("vit.embeddings.position_embeddings", (1, num_patches + 1, width))[0]
  # HF adds the table's first row to the class token; folding it in keeps that exact.
  encoder["cls_token"] = w.take("vit.embeddings.cls_token", (1, 1, width)) + pos[None, :1]
  if pos_embed == "learned":
    encoder["pos_embed"] = pos[1:]
  else:
    _check_sincos(pos[1:], pos_embed_lib.sincos_pos_embed_2d(width, grid), "vit.embeddings.position_embeddings",
                  "Convert with pos_embed='learned' and set config.model.pos_embed='learned'.")
  for i in range(c["depth"]):
    encoder[f"block_{i}"] = _block(w, f"vit.layers.{i}", width, c["mlp_dim"])
  encoder["norm"] = _norm(w, "vit.layernorm", width)

  decoder = dict(decoder_embed=_linear(w, "decoder.decoder_embed", width, dec_width),
                 mask_token=w.take("decoder.mask_token", (1, 1, dec_width)))
  _check_sincos(w.take("decoder.decoder_pos_embed", (1, num_patches + 1, dec_width))[0],
                pos_embed_lib.sincos_pos_embed_2d(dec_width, grid, cls_token=True), "decoder.decoder_pos_embed",
                "The sslx MAE decoder only supports the fixed table.")
  for i in range(c["decoder_depth"]):
    decoder[f"block_{i}"] = _block(w, f"decoder.decoder_layers.{i}", dec_width, c["decoder_mlp_dim"])
  decoder["norm"] = _norm(w, "decoder.decoder_norm", dec_width)
  decoder["pred"] = _linear(w, "decoder.decoder_pred", dec_width, p * p * c["channels"])
  w.check_all_taken()
  return dict(encoder=encoder, decoder=decoder)


def load_hf_vitmae(directory, *, pos_embed: str = "sincos") -> tuple[dict, dict]:
  """Reads a ``save_pretrained`` directory (``config.json`` + safetensors weights).

  Returns:
    ``(params, values)``: see :func:`convert_hf_vitmae` and :func:`config_from_hf`.
  """
  path = pathlib.Path(directory)
  hf_config = json.loads((path / "config.json").read_text())
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("load_hf_vitmae needs the 'safetensors' package: pip install safetensors") from e
  index = path / "model.safetensors.index.json"
  if (path / "model.safetensors").exists():
    state_dict = load_file(path / "model.safetensors")
  elif index.exists():
    state_dict = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
      state_dict.update(load_file(path / shard))
  else:
    raise FileNotFoundError(
        f"No model.safetensors in {path}. Only safetensors weights are supported (not pytorch_model.bin); "
        "re-save the model with save_pretrained() from a recent transformers to get them.")
  return convert_hf_vitmae(state_dict, hf_config, pos_embed=pos_embed), config_from_hf(hf_config)
