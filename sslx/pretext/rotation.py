"""Rotations by quarter turns (Gidaris et al. 2018, RotNet): the four turned copies of each image, labelled.

Direction: `rotate` turns each image of a ``(B, H, W, C)`` batch by ``k`` quarter turns *counter-clockwise*
as the image is displayed (row 0 at the top, column 0 at the left): exactly ``np.rot90(images, k, axes=(1,
2))`` (the H axis turns towards the W axis), and for ``k = 1`` RotNet's ``rotate_img(img, 90)``, i.e.
``np.flipud(np.transpose(img, (1, 0, 2)))`` on each ``(H, W, C)`` image. A quarter turn only moves pixels, so
every rotation is exact: ``rotate(rotate(x, k), 4 - k)`` is ``x`` bit for bit. Images must be square, so the
four copies share one shape and batch together.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_ROTATIONS = 4


def _check_square(images) -> None:
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"rotations need a (B, H, W, C) batch of square images, got shape {images.shape}")


def rotate(images: jax.Array, k: int) -> jax.Array:
  """``(B, H, W, C)`` ``images`` turned by ``k`` quarter turns counter-clockwise (any int ``k``, mod 4)."""
  _check_square(images)
  return jnp.rot90(images, k % NUM_ROTATIONS, axes=(1, 2))


def rotation_batch(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The ``4B`` inputs of one RotNet step and their ``(4B,)`` int32 labels.

  Row ``4 b + k`` is image ``b`` turned by ``k`` quarter turns, labelled ``k`` (image-major, as RotNet's data
  loader collates them): the four copies of an image stay on the device, and in the BatchNorm group, that
  holds the image.
  """
  _check_square(images)
  turned = jnp.stack([rotate(images, k) for k in range(NUM_ROTATIONS)], axis=1)
  labels = jnp.tile(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), images.shape[0])
  return turned.reshape((-1, *images.shape[1:])), labels
