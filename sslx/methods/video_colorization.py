"""Video colourisation by pointing (Vondrick et al., ECCV 2018, "Tracking Emerges by Colorizing Videos").

Each clip of ``T`` frames (``batch['frames']``, from a video source, `sslx.data.video`) is converted to CIE
Lab (`sslx.pretext.lab`). The network sees the grey frames only: ``(L - 50) / 50``, one channel. The
registry encoder maps each grey frame to a spatial map (a ResNet's ``aux['feature_map']``, or a ViT's patch
tokens on their grid), and a linear projection (a 1 x 1 convolution) turns it into ``embed_dim``-wide
embeddings ``f``. The last frame is the target, the ``T - 1`` before it the references; the target's colours
are predicted by pointing into the references (`sslx.pretext.propagation`):

  ``A_ij = softmax_j(f_i . f_j / tau)``,   ``p_i = sum_j A_ij onehot(c_j)``,

``j`` over every pixel of every reference frame, ``c_j`` the colour cluster of reference pixel ``j``: the
ab of Lab averaged over the pixels of its cell of the embedding grid, then the nearest of
``num_colors`` cluster centres. The loss is the cross-entropy of the true cluster ``y_i`` of each target cell
(`colorization_loss`). After training the same attention propagates any labels (`sslx.pretext.propagation`).

Colour clusters: k-means on the ab values of ``color_sample_clips`` clips of the training split (pixels of
evenly spaced clips, ``color_sample_pixels`` of them), as the paper clusters its training videos' colours.
They are computed once, when the method state is first made (not at `build`, so validating a config reads
no data), and stored in ``method_state['color_centers']``, so checkpoints carry them: a resumed run or a
propagation experiment uses exactly the clusters the run trained with, whatever the data holds by then.
(A fixed, data-free set, e.g. k-means over the sRGB gamut, would spend most clusters on saturated colours
that natural video rarely shows.)

Differences from the paper: the paper's embedding network is a ResNet-18 followed by 3D convolutions over
the clip; here each frame is embedded alone by the registry encoder (2-D), so the only temporal reasoning is
the attention itself. `Method.embed` is the encoder's pooled vector of one grey frame (so the standard kNN
and linear-probe commands can score the encoder on image datasets); the encoder reads one channel, L.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from sslx import config as config_lib
from sslx import models
from sslx.data import sources
from sslx.data import video
from sslx.methods import Method, RunLength, apply_train, subtree_variables
from sslx.pretext import lab
from sslx.pretext import propagation

# Large and negative but finite: a logsumexp over only these stays finite, and so do its gradients.
_EXCLUDED_LOGIT = -1e30


class FrameEmbedding(nn.Module):
  """Registry encoder + 1 x 1 projection: grey ``(N, H, W, 1)`` -> ``(N, h, w, embed_dim)`` float32.
  Params: ``{'encoder': ..., 'projection': ...}``."""
  encoder: nn.Module
  embed_dim: int

  @nn.compact
  def __call__(self, grey, *, train: bool):
    _, aux = self.encoder(grey, train=train)
    feature_map = spatial_map(aux, grey.shape[1:3])
    return nn.Dense(self.embed_dim, name="projection")(feature_map.astype(jnp.float32))


def spatial_map(aux: dict, image_size: tuple[int, int]):
  """The encoder's last spatial features ``(N, h, w, C)``: ``aux['feature_map']``, or patch tokens on their
  grid (square patches: the grid keeps the image's aspect)."""
  if "feature_map" in aux:
    return aux["feature_map"]
  tokens = aux["patch_tokens"]
  height, width = image_size
  rows = int(round(math.sqrt(tokens.shape[1] * height / width)))
  return tokens.reshape(tokens.shape[0], rows, tokens.shape[1] // rows, tokens.shape[2])


def default_config() -> ml_collections.ConfigDict:
  """``config.method``: the paper's 64-wide embeddings, temperature 1 and 16 colour clusters."""
  return ml_collections.ConfigDict(dict(
      name="video_colorization", embed_dim=64, temperature=1.0, num_colors=16, color_sample_clips=64,
      color_sample_pixels=20_000))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or a data key the method needs)."""
  c = config.method
  config_lib.check_section_keys(c, default_config(), "method", "video colourisation")
  config_lib.check_int(c.embed_dim, "method.embed_dim")
  config_lib.check_number(c.temperature, "method.temperature", lambda t: t > 0, "> 0")
  config_lib.check_int(c.num_colors, "method.num_colors", 2)
  config_lib.check_int(c.color_sample_clips, "method.color_sample_clips")
  config_lib.check_int(c.color_sample_pixels, "method.color_sample_pixels", c.num_colors)
  if config.data.source not in video.VIDEO_SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r}: video colourisation learns from clips; use "
                     f"one of {video.VIDEO_SOURCES}")
  if config.data.channels != 3:
    raise ValueError(f"config.data.channels={config.data.channels}: video colourisation needs colour frames (3)")
  size = config.data.image_size
  rows, cols = feature_grid(config)
  if size % rows or size % cols:
    raise ValueError(f"config.data.image_size={size} is not a whole number of the encoder's {rows}x{cols} "
                     "feature cells; colours are averaged per cell")


def feature_grid(config) -> tuple[int, int]:
  """``(h, w)`` of the encoder's spatial map on ``config.data.image_size`` frames (shapes only)."""
  size = config.data.image_size
  encoder = models.encoder_from_config(config.model)

  def feature_map(x):
    (_, aux), _ = encoder.init_with_output(jax.random.PRNGKey(0), x, train=False)
    return spatial_map(aux, (size, size))

  return tuple(jax.eval_shape(feature_map, jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)).shape[1:3])


def colorization_loss(target_features, reference_features, reference_colors, target_colors, *,
                      temperature: float, num_colors: int):
  """Cross-entropy of the colours propagated from the references to the target.

  With ``A_ij = softmax_j(f_i . f_j / tau)`` over the ``M`` reference cells and
  ``p_i(k) = sum_j A_ij [c_j = k]``:

    ``loss = -(1 / |V|) sum_{b, i in V} log p_bi(y_bi)``,
    ``log p_i(y_i) = logsumexp_{j: c_j = y_i}(f_i . f_j / tau) - logsumexp_j(f_i . f_j / tau)``,

  ``V`` the target cells whose colour occurs among their clip's references (for the others ``p_i(y_i) = 0``
  whatever the embeddings, so they carry no gradient, and no finite loss).

  Args:
    target_features: ``(B, N, D)``.
    reference_features: ``(B, M, D)``.
    reference_colors: int ``(B, M)`` cluster of each reference cell, in ``[0, num_colors)``.
    target_colors: int ``(B, N)`` true cluster of each target cell.
    temperature: ``tau``.
    num_colors: the number of clusters.

  Returns:
    ``(loss, metrics)``: ``color_accuracy`` (% of cells of ``V`` whose most probable cluster is ``y_i``) and
    ``matched_fraction`` (``|V|`` over all target cells).
  """
  logits = propagation.attention_logits(target_features, reference_features, temperature)
  same = reference_colors[:, None, :] == target_colors[:, :, None]
  matched = jnp.any(same, axis=-1)
  log_true = jax.nn.logsumexp(jnp.where(same, logits, _EXCLUDED_LOGIT), axis=-1)
  log_prob = log_true - jax.nn.logsumexp(logits, axis=-1)
  count = jnp.maximum(jnp.sum(matched), 1)
  loss = -jnp.sum(jnp.where(matched, log_prob, 0.0)) / count
  probabilities = jnp.einsum("bnm,bmk->bnk", jax.nn.softmax(logits, axis=-1),
                             jax.nn.one_hot(reference_colors, num_colors))
  correct = (jnp.argmax(probabilities, axis=-1) == target_colors) & matched
  metrics = {"color_accuracy": 100.0 * jnp.sum(correct) / count,
             "matched_fraction": jnp.mean(matched.astype(jnp.float32))}
  return loss, metrics


def to_lab(images, mean, std):
  """Normalised RGB ``(..., 3)`` (``config.data.mean`` / ``std``) -> CIE Lab ``(..., 3)``."""
  rgb = images.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  return lab.rgb_to_lab(jnp.clip(rgb, 0.0, 1.0))


def grey_from_lab(lab_images):
  """The network's input: ``(L - 50) / 50``, one channel."""
  return (lab_images[..., :1] - 50.0) / 50.0


def quantize(ab, centers):
  """Index of the nearest of ``centers`` ``(K, 2)`` for each ab value ``(..., 2)``."""
  distances = jnp.sum((ab[..., None, :] - centers) ** 2, axis=-1)
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 50) -> np.ndarray:
  """Lloyd's k-means of ``points`` ``(P, d)`` from a k-means++ start drawn with ``seed``; ``(k, d)`` float32.
  A cluster that empties keeps its centre."""
  rng = np.random.default_rng(seed)
  points = np.asarray(points, np.float64)
  centers = [points[rng.integers(len(points))]]
  for _ in range(1, k):
    nearest = np.min(((points[:, None] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
    total = nearest.sum()
    pick = rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
    centers.append(points[pick])
  centers = np.array(centers)
  for _ in range(iterations):
    assignment = np.argmin(((points[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    for cluster in range(k):
      members = points[assignment == cluster]
      if len(members):
        centers[cluster] = members.mean(axis=0)
  return centers.astype(np.float32)


def color_centers(config) -> np.ndarray:
  """``num_colors`` k-means centres of the ab values of the training split (see the module docstring)."""
  c = config.method
  source = sources.make_source(config.data, config.data.split)
  indices = np.unique(np.linspace(0, len(source) - 1, min(c.color_sample_clips, len(source))).astype(int))
  clips = [source[int(i)] for i in indices]
  frames = [clip["frames"] for clip in clips if not sources.is_bad(clip)]
  if not frames:
    raise ValueError(f"none of the {len(clips)} clips sampled for the colour clusters could be decoded")
  pixels = np.concatenate([f.reshape(-1, f.shape[-1]) for f in frames]).astype(np.float32) / 255.0
  rng = np.random.default_rng(config.seed)
  pixels = pixels[rng.choice(len(pixels), min(c.color_sample_pixels, len(pixels)), replace=False)]
  with jax.ensure_compile_time_eval():  # called while `init` is traced; these are concrete numbers
    ab = np.asarray(lab.rgb_to_lab(pixels))[:, 1:]
  return kmeans(ab, c.num_colors, config.seed)


def build(config, run_length: RunLength) -> Method:
  """The video colourisation bundle (no schedule depends on the run's length)."""
  del run_length
  encoder = models.encoder_from_config(config.model)
  model = FrameEmbedding(encoder, int(config.method.embed_dim))
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  temperature, num_colors = float(config.method.temperature), int(config.method.num_colors)
  computed = {}

  def centers():
    # Once, when the state is first made: validating a config never reads the data.
    if "centers" not in computed:
      computed["centers"] = color_centers(config)
    return computed["centers"]

  def encoder_variables(variables, method_state):
    del method_state
    return subtree_variables(variables, "encoder")

  def init(rng, batch):
    grey = grey_from_lab(to_lab(batch["image"][:1], mean, std))
    variables = model.init({"params": rng}, grey, train=False)
    return dict(variables), {"color_centers": jnp.asarray(centers())}

  def loss_fn(variables, method_state, batch, rng):
    lab_frames = to_lab(batch["frames"], mean, std)
    batch_size, length, height, width, _ = lab_frames.shape
    grey = grey_from_lab(lab_frames).reshape(batch_size * length, height, width, 1)
    embeddings, model_state = apply_train(model, variables, grey, rngs={"dropout": rng})
    _, rows, cols, dim = embeddings.shape
    embeddings = embeddings.reshape(batch_size, length, rows * cols, dim)
    ab = propagation.cell_average(lab_frames[..., 1:], (rows, cols))
    colors = quantize(ab, method_state["color_centers"]).reshape(batch_size, length, rows * cols)
    loss, metrics = colorization_loss(
        embeddings[:, -1], embeddings[:, :-1].reshape(batch_size, -1, dim), colors[:, :-1].reshape(batch_size, -1),
        colors[:, -1], temperature=temperature, num_colors=num_colors)
    return loss, ({"loss": loss, **metrics}, method_state, model_state)

  def embed(variables, method_state, images):
    grey = grey_from_lab(to_lab(images, mean, std))
    _, aux = encoder.apply(encoder_variables(variables, method_state), grey, train=False)
    return jax.lax.stop_gradient(aux["pooled"]).astype(jnp.float32)

  return Method(name="video_colorization", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables)


def frame_embedder(config):
  """``(variables, images) -> (N, h, w, embed_dim)``: the trained embeddings of normalised RGB frames
  ``(N, H, W, 3)`` in evaluation mode, for propagation (`sslx.pretext.propagation`)."""
  model = FrameEmbedding(models.encoder_from_config(config.model), int(config.method.embed_dim))
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def apply(variables, images):
    return model.apply(variables, grey_from_lab(to_lab(images, mean, std)), train=False)

  return apply
