"""CIE Lab colour (D65 white, 2-degree observer) from and to sRGB, in pure ``jnp`` (jittable, vmappable).

The definition is scikit-image's ``rgb2lab`` / ``lab2rgb`` (sRGB companding, the sRGB-to-XYZ matrix of the
sRGB specification, reference white ``(0.95047, 1, 1.08883)``, the CIE ``7.787 t + 16/116`` linear segment
below ``t = 0.008856``), so Lab images built here match the colourisation literature, which used it.
Every branch is evaluated on a clamped argument, so neither the values nor the gradients of the branch
that ``jnp.where`` discards can be NaN.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# sRGB (linear) -> CIE XYZ, from the sRGB specification (the matrix scikit-image uses).
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])

# CIE Lab's cube-root curve switches to a line below this (normalised) XYZ value; its image is 0.2068966.
_LAB_EPSILON = 0.008856
_LAB_SLOPE = 7.787
_LAB_OFFSET = 16.0 / 116.0
_LAB_CUBE_THRESHOLD = 0.2068966


def _srgb_to_linear(c):
  curved = ((jnp.maximum(c, 0.04045) + 0.055) / 1.055) ** 2.4
  return jnp.where(c > 0.04045, curved, c / 12.92)


def _linear_to_srgb(c):
  curved = 1.055 * jnp.maximum(c, 0.0031308) ** (1.0 / 2.4) - 0.055
  return jnp.where(c > 0.0031308, curved, 12.92 * c)


def _matmul_last(matrix: np.ndarray, x):
  return jnp.einsum("ij,...j->...i", jnp.asarray(matrix, x.dtype), x)


def rgb_to_lab(rgb):
  """sRGB ``(..., 3)`` in ``[0, 1]`` -> CIE Lab ``(..., 3)``: ``L`` in ``[0, 100]``, ``a``, ``b`` about in
  ``[-128, 128]``. Inputs outside ``[0, 1]`` are converted by the same formulas (no clipping), as
  scikit-image does."""
  rgb = jnp.asarray(rgb)
  if not jnp.issubdtype(rgb.dtype, jnp.floating):
    raise ValueError(f"rgb_to_lab needs a float array in [0, 1], got dtype {rgb.dtype}")
  xyz = _matmul_last(_XYZ_FROM_RGB, _srgb_to_linear(rgb)) / jnp.asarray(_D65_WHITE, rgb.dtype)
  f = jnp.where(xyz > _LAB_EPSILON, jnp.cbrt(jnp.maximum(xyz, _LAB_EPSILON)), _LAB_SLOPE * xyz + _LAB_OFFSET)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab):
  """CIE Lab ``(..., 3)`` -> sRGB ``(..., 3)`` clipped to ``[0, 1]``: the inverse of `rgb_to_lab` on the sRGB
  gamut. As in scikit-image, a negative ``z`` (out of the XYZ gamut) is set to zero before the cube."""
  lab = jnp.asarray(lab)
  fy = (lab[..., 0] + 16.0) / 116.0
  fx = lab[..., 1] / 500.0 + fy
  fz = jnp.maximum(fy - lab[..., 2] / 200.0, 0.0)
  f = jnp.stack([fx, fy, fz], axis=-1)
  xyz = jnp.where(f > _LAB_CUBE_THRESHOLD, f ** 3, (f - _LAB_OFFSET) / _LAB_SLOPE)
  xyz = xyz * jnp.asarray(_D65_WHITE, lab.dtype)
  rgb = _linear_to_srgb(_matmul_last(_RGB_FROM_XYZ, xyz))
  return jnp.clip(rgb, 0.0, 1.0)
