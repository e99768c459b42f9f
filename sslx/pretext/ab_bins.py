"""Quantised ab colour (Zhang, Isola & Efros 2016): in-gamut bins, soft encoding, class rebalancing, decoding.

**Bins.** The ab plane is cut into squares of side 10 centred on the multiples of 10 (a pixel belongs to the
nearest centre). A bin is kept when some 8-bit sRGB colour lands in it (`in_gamut_bins`): 261 bins, a from
-90 to 100 and b from -110 to 90. Zhang's ``pts_in_hull.npy`` holds 313 bins over about the same range; no
rule we tried on the sRGB gamut gives 313 (bins reached by a dense continuous sampling: 262; grid centres
inside the convex hull of the gamut's ab: 233; centres in gamut for some L: 229; centres within 10 of the
gamut: 290), so the published set must include bins that no sRGB colour reaches (e.g. a = -90 with b from 50),
which can never be targets. Every Lab colour that sRGB images hold falls in one of our 261 bins.

**Soft encoding** (`soft_encode`): each ab value becomes weights on its ``k`` nearest bin centres (``k = 10``
in the reference training layer, 5 in the paper's text), ``exp(-d^2 / (2 sigma^2))`` with ``sigma = 5``,
normalised to sum to one.

**Class rebalancing** (`rebalancing_weights`): with ``p`` the empirical bin distribution of a data set
smoothed by a Gaussian of ``sigma = 5`` over the bin centres, ``w_q ~ ((1 - lambda) p_q + lambda / Q)^-1``
with ``lambda = 0.5``, scaled so ``sum_q p_q w_q = 1``; a pixel's weight is that of its nearest bin. The
prior is a fixed input (a ``.npy`` of ``Q`` probabilities that `estimate_prior` writes, as the paper's prior
came from ImageNet's training set): fixed weights keep the loss a stationary objective and a resumed run
identical.

**Annealed mean** (`annealed_mean`): ``sum_q c_q softmax(logits / T)_q``, the distribution's mean after its
temperature is lowered to ``T`` (0.38 in the paper): ``T = 1`` is the mean, ``T -> 0`` the mode.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sslx.pretext.lab import rgb_to_lab

GRID = 10.0
SOFT_SIGMA = 5.0
NEIGHBOURS = 10
PRIOR_SIGMA = 5.0
UNIFORM_MIX = 0.5
ANNEALED_T = 0.38


def _rgb_cube_faces(levels: int = 256) -> np.ndarray:
  """Every 8-bit colour on the surface of the RGB cube, in [0, 1]. The ab projection of the gamut (a solid)
  is the projection of its surface, so the surface reaches every bin the interior does."""
  values = np.arange(levels, dtype=np.float32) / (levels - 1)
  u, v = (x.ravel() for x in np.meshgrid(values, values, indexing="ij"))
  faces = []
  for axis in range(3):
    for side in (0.0, 1.0):
      columns = [u, v]
      columns.insert(axis, np.full_like(u, side))
      faces.append(np.stack(columns, axis=-1))
  return np.concatenate(faces)


@functools.lru_cache(maxsize=None)
def in_gamut_bins() -> np.ndarray:
  """``(Q, 2)`` float32 ab centres (multiples of `GRID`) of the bins some 8-bit sRGB colour falls in, sorted
  by a then b. Computed once, on the host."""
  with jax.ensure_compile_time_eval():
    ab = np.asarray(rgb_to_lab(jnp.asarray(_rgb_cube_faces())))[:, 1:]
  cells = np.unique(np.round(ab / GRID).astype(np.int64), axis=0)
  return (cells * GRID).astype(np.float32)


def num_bins() -> int:
  return len(in_gamut_bins())


def _squared_distances(ab, centers):
  return jnp.sum((ab[..., None, :] - centers) ** 2, axis=-1)


def nearest_bin(ab) -> jax.Array:
  """``(...)`` int32 index of the bin centre nearest to each ab value ``(..., 2)``."""
  centers = jnp.asarray(in_gamut_bins())
  return jnp.argmin(_squared_distances(jnp.asarray(ab, jnp.float32), centers), axis=-1).astype(jnp.int32)


def soft_encode(ab, *, k: int = NEIGHBOURS, sigma: float = SOFT_SIGMA) -> jax.Array:
  """``(..., Q)`` float32 soft encoding of ab values ``(..., 2)``: Gaussian weights on the ``k`` nearest bin
  centres, ``exp(-d^2 / (2 sigma^2))``, summing to one; zero elsewhere."""
  centers = jnp.asarray(in_gamut_bins())
  ab = jnp.asarray(ab, jnp.float32)
  flat = _squared_distances(ab.reshape(-1, 2), centers)
  neg_distances, nearest = jax.lax.top_k(-flat, k)
  weights = jax.nn.softmax(neg_distances / (2.0 * sigma ** 2), axis=-1)
  encoded = jnp.zeros_like(flat).at[jnp.arange(flat.shape[0])[:, None], nearest].set(weights)
  return encoded.reshape(*ab.shape[:-1], len(centers))


def smooth_prior(prior, *, sigma: float = PRIOR_SIGMA) -> np.ndarray:
  """``prior`` (Q,) convolved with a Gaussian of ``sigma`` over the bin centres and renormalised."""
  centers = in_gamut_bins().astype(np.float64)
  kernel = np.exp(-np.sum((centers[:, None] - centers[None]) ** 2, axis=-1) / (2.0 * sigma ** 2))
  smoothed = kernel @ np.asarray(prior, np.float64)
  return smoothed / smoothed.sum()


def rebalancing_weights(prior: Optional[np.ndarray] = None, *, mix: float = UNIFORM_MIX,
                        sigma: float = PRIOR_SIGMA) -> np.ndarray:
  """``(Q,)`` float32 class weights ``w ~ ((1 - mix) p + mix / Q)^-1`` with ``sum_q p_q w_q = 1``, ``p`` the
  `smooth_prior` of ``prior`` (None: uniform, every weight 1)."""
  q = num_bins()
  if prior is None:
    return np.ones((q,), np.float32)
  prior = np.asarray(prior, np.float64)
  if prior.shape != (q,) or not np.all(np.isfinite(prior)) or np.any(prior < 0) or prior.sum() <= 0:
    raise ValueError(f"an ab prior must hold {q} finite non-negative probabilities, got shape {prior.shape}")
  smoothed = smooth_prior(prior / prior.sum(), sigma=sigma)
  weights = 1.0 / ((1.0 - mix) * smoothed + mix / q)
  return (weights / np.sum(smoothed * weights)).astype(np.float32)


def load_prior(path: Optional[str]) -> Optional[np.ndarray]:
  """The prior saved at ``path`` by `estimate_prior` (None: None, the uniform prior)."""
  if path is None:
    return None
  prior = np.load(path)
  if prior.shape != (num_bins(),):
    raise ValueError(f"{path!r} holds an array of shape {prior.shape}, not the {num_bins()} ab bin "
                     "probabilities")
  return prior


def estimate_prior(images: Iterable[np.ndarray]) -> np.ndarray:
  """``(Q,)`` float64 empirical distribution of the nearest bins of every pixel of ``images``, uint8 RGB
  arrays ``(..., H, W, 3)`` (unsmoothed: `rebalancing_weights` smooths it)."""
  counts = np.zeros((num_bins(),), np.float64)
  to_bins = jax.jit(lambda rgb: nearest_bin(rgb_to_lab(rgb.astype(jnp.float32) / 255.0)[..., 1:]))
  for image in images:
    counts += np.bincount(np.asarray(to_bins(np.asarray(image))).ravel(), minlength=len(counts))
  if counts.sum() == 0:
    raise ValueError("estimate_prior was given no pixels")
  return counts / counts.sum()


def annealed_mean(logits, temperature: float = ANNEALED_T) -> jax.Array:
  """``(..., 2)`` ab of ``(..., Q)`` logits: ``sum_q c_q softmax(logits / T)_q``."""
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  return probs @ jnp.asarray(in_gamut_bins())


def main(argv=None) -> None:
  """``python -m sslx.pretext.ab_bins --config=configs/colorization_folder.py --out=prior.npy
  [--num_images=N] [--config.data.data_dir=...]``: the ab prior of the first N training images of the config's
  data, decoded without augmentation, for ``config.method.ab_prior``."""
  from absl import app, flags
  from ml_collections import config_flags

  from sslx.data import sources

  config = config_flags.DEFINE_config_file("config", None, "A run config whose data to read.")
  out = flags.DEFINE_string("out", None, "Where to write the prior (.npy).")
  count = flags.DEFINE_integer("num_images", 10_000, "How many training images to read.", lower_bound=1)
  flags.mark_flags_as_required(["config", "out"])

  def run(_):
    source = sources.make_source(config.value.data, config.value.data.split)
    images = (source[i]["image"] for i in range(min(count.value, len(source))))
    prior = estimate_prior(image for image in images if image is not None and image.shape[-1] == 3)
    np.save(out.value, prior)
    print(f"wrote the ab prior of {min(count.value, len(source))} images to {out.value}")

  app.run(run, argv)


if __name__ == "__main__":
  main()
