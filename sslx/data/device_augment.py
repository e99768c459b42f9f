"""The per-pixel augmentation ops as batched JAX functions, run inside the jitted training step.

With ``config.data.augment_on='device'`` every view's spec is cut in two by ``split_spec``: the grain
workers run its leading crops and flips on the host and ship uint8 images, and the rest (colour
jitter, grayscale, blur, solarize, normalize, a flip that comes after them) runs here on the whole
batch. The spec grammar and the op arguments are the host registry's (``transforms.py``); only these
ops have a device version::

  hflip  color_jitter  grayscale  blur  solarize  normalize

Each op is two functions: a ``sample_*`` function draws per-example parameters from a JAX key, and
a ``*_pixels`` function applies given parameters to a (B, H, W, C) batch. For the same parameters a
``*_pixels`` function computes what the host op in ``color.py`` computes for each image, with the
same float32 formulas and the same rounding to whole uint8 levels (images stay float32 here, with
integral values in [0, 255] between ops). Float32 sums taken in another order can move a value that
sits on a half level by one level: outputs match the host's within one level.

A random op draws its parameters for every example and selects the result per example, so it costs
its full price whatever its probability (a blur with p=0.5 blurs the whole batch). Colour jitter,
whose four adjustments come in a random order per example, runs each blend twice over the batch
(masked: before or after the image's hue shift) and the hue shift once. Which placement is faster
where: docs/benchmarks.md, "Where augmentation runs".
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslx.data import color
from sslx.data import transforms
from sslx.data import views

# Geometric ops that stay in the grain workers when they lead a spec: a crop needs the decoded
# image of any size, and a flip there is a strided view that batching copies anyway.
HOST_OPS = ("random_resized_crop", "center_crop", "hflip")
AUGMENT_ON = ("host", "device")

# Batch dimension first: parameters of shape (B,) broadcast over (B, H, W, C).
_PER_EXAMPLE = (slice(None), None, None, None)


class DeviceOp(NamedTuple):
  """A spec op on the device: ``sample(key, batch_size) -> params``, ``apply(images, params)``."""
  sample: Callable[[jax.Array, int], dict[str, jax.Array]]
  apply: Callable[[jax.Array, dict[str, jax.Array]], jax.Array]


def split_spec(spec: str) -> tuple[str, str]:
  """Splits a spec into ``(host_spec, device_spec)``: its leading crops and flips, and the rest.

  Raises:
    ValueError: the spec does not start with a crop, or an op of the device part (the one named)
      has no device version.
  """
  calls = transforms.parse_ops(spec)
  cut = next((i for i, call in enumerate(calls) if call.name not in HOST_OPS), len(calls))
  host, device = calls[:cut], calls[cut:]
  if not any(call.name in ("random_resized_crop", "center_crop") for call in host):
    raise ValueError(f"augmentation spec {spec!r} does not start with its crop (random_resized_crop "
                     "or center_crop), so the host part that config.data.augment_on='device' "
                     "leaves to the data workers would make images of different sizes")
  for call in device:
    if call.name not in _DEVICE_OPS:
      raise ValueError(f"augmentation op {call.text!r} has no device version; with "
                       "config.data.augment_on='device' every op after the leading crops and flips "
                       f"runs on the device, which has {sorted(_DEVICE_OPS)}. Move it before the "
                       "colour ops or set config.data.augment_on='host'")
  return "|".join(call.text for call in host), "|".join(call.text for call in device)


def host_part(spec: str) -> str:
  """The ops of ``spec`` that the grain workers run when augmenting on the device."""
  return split_spec(spec)[0]


# --- Pixel math: parameters in, images out ---------------------------------------------------------


def luma(images: jax.Array) -> jax.Array:
  """(B, H, W, 1) luma, 0.299 R + 0.587 G + 0.114 B; a 1-channel image is its own luma."""
  if images.shape[-1] == 1:
    return images
  red, green, blue = (images[..., i:i + 1] for i in range(3))
  weights = color.LUMA_WEIGHTS
  return red * weights[0] + green * weights[1] + blue * weights[2]


def flip_pixels(images: jax.Array, flip: jax.Array) -> jax.Array:
  """Mirrors left-right the images whose ``flip`` (B,) is True."""
  return jnp.where(flip[_PER_EXAMPLE], images[:, :, ::-1], images)


def _blend(images: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  """``clip(other + factor * (image - other), 0, 255)`` with a per-example factor, as the host."""
  return jnp.clip((images - other) * factor[_PER_EXAMPLE] + other, 0, 255)


def hue_pixels(images: jax.Array, shift: jax.Array) -> jax.Array:
  """``color.adjust_hue`` per example: rotates hue by ``shift`` (B,) turns in HSV space."""
  if images.shape[-1] == 1:
    return images
  red, green, blue = images[..., 0], images[..., 1], images[..., 2]
  value = jnp.maximum(jnp.maximum(red, green), blue)
  chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
  safe_chroma = jnp.where(chroma > 0, chroma, 1)
  sixths = jnp.where(value == red, (green - blue) / safe_chroma,
                     jnp.where(value == green, (blue - red) / safe_chroma + 2,
                               (red - green) / safe_chroma + 4))
  sixths = _wrap_sixths(sixths + 6 * shift[:, None, None])
  channels = []
  for n in (5, 3, 1):
    k = _wrap_sixths(sixths + n)
    channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4 - k), 0, 1))
  return jnp.stack(channels, axis=-1)


def _wrap_sixths(x: jax.Array) -> jax.Array:
  """``x mod 6`` for ``x`` in [-6, 12), the host's way, so both round alike."""
  x = jnp.where(x < 0, x + 6, x)
  return jnp.where(x >= 6, x - 6, x)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def jitter_pixels(images: jax.Array, apply: jax.Array, order: jax.Array, factors: jax.Array,
                  active: Sequence[bool] = (True,) * 4) -> jax.Array:
  """``color.color_jitter`` per example, given its draws.

  The blends (brightness, contrast, saturation) that an image's order puts before its hue shift run
  first, then the hue shift of the whole batch, then the blends after it: the same order per image,
  with the costly hue shift computed once rather than at each of the four positions.

  Args:
    images: float32 (B, H, W, C), integral values in [0, 255].
    apply: (B,) bool, whether an image is jittered at all.
    order: (B, 4) int, a permutation of (brightness, contrast, saturation, hue) per image.
    factors: (B, 4) float, the factors of the four adjustments (the hue one is a shift in turns).
    active: which adjustments have a non-zero strength; the others are skipped, as on the host.
  """
  is_hue = order == HUE
  blends_before_hue = jnp.argmax(is_hue, axis=1)
  # The three blends in their drawn order: a stable sort moves the hue shift to the end.
  blend_order = jnp.take_along_axis(order, jnp.argsort(is_hue, axis=1, stable=True)[:, :HUE],
                                    axis=1)
  out = images
  if not active[HUE]:
    for slot in range(3):
      out = _blend_slot(out, blend_order[:, slot], factors, active, True)
  else:
    for slot in range(3):
      out = _blend_slot(out, blend_order[:, slot], factors, active, slot < blends_before_hue)
    # Materialized: fused into the blends after it, whose luma and mean read all three channels
    # of every pixel, XLA would compute the hue shift several times over (2x slower on a CPU).
    out = jax.lax.optimization_barrier(hue_pixels(out, factors[:, HUE]))
    for slot in range(3):
      out = _blend_slot(out, blend_order[:, slot], factors, active, slot >= blends_before_hue)
  return jnp.where(apply[_PER_EXAMPLE], jnp.round(out), images)


def _blend_slot(images: jax.Array, adjustment: jax.Array, factors: jax.Array,
                active: Sequence[bool], runs) -> jax.Array:
  """Applies each image's blend ``adjustment`` (B,) in {brightness, contrast, saturation} where it
  ``runs`` and is active; they differ only in what they blend with."""
  factor = jnp.take_along_axis(factors, adjustment[:, None], axis=1)[:, 0]
  gray = luma(images)
  other = jnp.where((adjustment == BRIGHTNESS)[_PER_EXAMPLE], 0.0, gray)
  if active[CONTRAST]:
    other = jnp.where((adjustment == CONTRAST)[_PER_EXAMPLE],
                      gray.mean(axis=(1, 2, 3), keepdims=True), other)
  runs = runs & jnp.asarray(active[:HUE])[adjustment]
  return jnp.where(runs[_PER_EXAMPLE], _blend(images, other, factor), images)


def grayscale_pixels(images: jax.Array, apply: jax.Array) -> jax.Array:
  """``color.to_grayscale`` of the images whose ``apply`` (B,) is True."""
  gray = jnp.broadcast_to(jnp.round(luma(images)), images.shape)
  return jnp.where(apply[_PER_EXAMPLE], gray, images)


def blur_pixels(images: jax.Array, apply: jax.Array, sigma: jax.Array,
                kernel_size: Optional[int] = None) -> jax.Array:
  """``color.gaussian_blur`` of the images whose ``apply`` (B,) is True, each with its ``sigma``.

  ``kernel_size`` None is ``color.blur_kernel_size`` of the images. Separable, rows then columns,
  borders reflected without repeating the edge pixel, rounded once at the end. Each pass is a
  batched matrix product with a per-example banded matrix that holds the reflected borders: on a
  CPU it measured 2x faster than summing shifted copies, which XLA fuses badly behind other ops,
  and accelerators run matrix products fastest of all.
  """
  height, width = images.shape[1:3]
  radius = (kernel_size or color.blur_kernel_size(height, width)) // 2
  if radius == 0:
    return images
  if radius >= min(height, width):
    raise ValueError(f"blur kernel_size={2 * radius + 1} is too large for {height}x{width} images "
                     "on the device (its border reflection needs a radius below the image side)")
  offsets = jnp.arange(1, radius + 1, dtype=jnp.float32)
  center = 1 / (1 + 2 * jnp.exp(-0.5 * (offsets / sigma[:, None]) ** 2).sum(axis=1))
  # 'highest': float32 products on accelerators too, which would otherwise round inputs to bf16/tf32.
  out = jnp.einsum("boi,biwc->bowc", _blur_matrix(height, radius, sigma, center), images,
                   precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum("boi,bhic->bhoc", _blur_matrix(width, radius, sigma, center), out,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.where(apply[_PER_EXAMPLE], jnp.round(out), images)


def _blur_matrix(size: int, radius: int, sigma: jax.Array, center: jax.Array) -> jax.Array:
  """(B, size, size): ``out[o] = sum_i matrix[o, i] * in[i]`` is the 1-D blur with reflection.

  Output ``o`` takes input ``o + k`` with weight ``w(k) = center * exp(-k**2 / (2 sigma**2))`` for
  ``|k| <= radius``; an index ``o + k`` below 0 reads input ``-(o + k)``, above ``size - 1`` input
  ``2 (size - 1) - (o + k)``. So input ``i`` gets ``w(i - o)``, plus ``w(i + o)`` for ``i >= 1``
  (reflected at the first pixel), plus ``w(2 (size - 1) - i - o)`` for ``i <= size - 2`` (at the last).
  """
  out_index = np.arange(size)[:, None]
  in_index = np.arange(size)[None, :]
  inv_variance = (1 / sigma ** 2)[:, None, None]

  def weight(offset: np.ndarray, valid: np.ndarray) -> jax.Array:
    taps = center[:, None, None] * jnp.exp(-0.5 * offset.astype(np.float32) ** 2 * inv_variance)
    return jnp.where(valid & (np.abs(offset) <= radius), taps, 0)

  reflected_low = in_index + out_index
  reflected_high = 2 * (size - 1) - in_index - out_index
  return (weight(in_index - out_index, np.ones((size, size), bool))
          + weight(reflected_low, in_index >= 1) + weight(reflected_high, in_index <= size - 2))


def solarize_pixels(images: jax.Array, apply: jax.Array, threshold: int = 128) -> jax.Array:
  """``color.solarize`` (invert the pixels >= ``threshold``) of the images whose ``apply`` is True."""
  return jnp.where(apply[_PER_EXAMPLE] & (images >= threshold), 255 - images, images)


def normalize_pixels(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """``transforms.normalize``: float32 ``(pixel / 255 - mean) / std`` per channel."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return images.astype(jnp.float32) * (1 / (255 * std)) - mean / std


# --- Parameter draws -------------------------------------------------------------------------------


def sample_apply(key: jax.Array, batch_size: int, p: float) -> jax.Array:
  """(B,) bool, True with probability ``p`` independently per example."""
  return jax.random.uniform(key, (batch_size,)) < p


def sample_jitter(key: jax.Array, batch_size: int, *, p: float, brightness: float,
                  contrast: float, saturation: float, hue: float) -> dict[str, jax.Array]:
  """``jitter_pixels``' parameters, distributed as ``color.color_jitter`` draws them.

  An order uniform over the 24 permutations (argsort of i.i.d. uniforms); factors uniform in
  ``[max(0, 1 - x), 1 + x]`` for brightness, contrast and saturation and in ``[-hue, hue]`` for hue.
  """
  apply_key, order_key, factor_key = jax.random.split(key, 3)
  strengths = (brightness, contrast, saturation)
  low = jnp.array([max(0.0, 1 - x) for x in strengths] + [-hue], jnp.float32)
  high = jnp.array([1 + x for x in strengths] + [hue], jnp.float32)
  return dict(apply=sample_apply(apply_key, batch_size, p),
              order=jnp.argsort(jax.random.uniform(order_key, (batch_size, 4)), axis=1),
              factors=jax.random.uniform(factor_key, (batch_size, 4), minval=low, maxval=high))


def sample_blur(key: jax.Array, batch_size: int, *, p: float,
                sigma: Sequence[float]) -> dict[str, jax.Array]:
  """Whether to blur (probability ``p``) and a sigma uniform in ``sigma``, per example."""
  apply_key, sigma_key = jax.random.split(key)
  return dict(apply=sample_apply(apply_key, batch_size, p),
              sigma=jax.random.uniform(sigma_key, (batch_size,), minval=sigma[0],
                                       maxval=sigma[1]))


# --- The registry: host op arguments -> device op ---------------------------------------------------


def _flip(p: float) -> DeviceOp:
  return DeviceOp(lambda key, n: dict(flip=sample_apply(key, n, p)),
                  lambda images, params: flip_pixels(images, params["flip"]))


def _color_jitter(p: float, **strengths: float) -> DeviceOp:
  active = tuple(strengths[name] > 0 for name in ("brightness", "contrast", "saturation", "hue"))
  return DeviceOp(functools.partial(sample_jitter, p=p, **strengths),
                  lambda images, params: jitter_pixels(images, **params, active=active))


def _grayscale(p: float) -> DeviceOp:
  return DeviceOp(lambda key, n: dict(apply=sample_apply(key, n, p)),
                  lambda images, params: grayscale_pixels(images, params["apply"]))


def _blur(p: float, sigma: Sequence[float], kernel_size: Optional[int]) -> DeviceOp:
  return DeviceOp(functools.partial(sample_blur, p=p, sigma=sigma),
                  lambda images, params: blur_pixels(images, **params, kernel_size=kernel_size))


def _solarize(p: float, threshold: int) -> DeviceOp:
  return DeviceOp(lambda key, n: dict(apply=sample_apply(key, n, p)),
                  lambda images, params: solarize_pixels(images, params["apply"], threshold))


def _normalize(mean: Sequence[float], std: Sequence[float]) -> DeviceOp:
  return DeviceOp(lambda key, n: {}, lambda images, params: normalize_pixels(images, mean, std))


_DEVICE_OPS: dict[str, Callable[..., DeviceOp]] = {
    "hflip": _flip, "color_jitter": _color_jitter, "grayscale": _grayscale, "blur": _blur,
    "solarize": _solarize, "normalize": _normalize,
}


def build_device_ops(device_spec: str, *, mean: Sequence[float],
                     std: Sequence[float]) -> tuple[DeviceOp, ...]:
  """The device ops of ``device_spec`` (from ``split_spec``), ending with a normalize.

  The host registry checks the arguments and fills in their defaults, so an op takes the same
  arguments, and fails with the same message, on both sides. ``mean`` and ``std`` are the defaults of
  ``normalize``, which is appended when the spec does not end with it.

  Raises:
    ValueError: naming the op that is unknown, has no device version or has bad arguments.
  """
  if not device_spec:
    return (_normalize(tuple(mean), tuple(std)),)
  calls = transforms.parse_ops(device_spec)
  host_ops = transforms.build_augmentation(device_spec, mean=mean, std=std).ops
  ops = []
  for call, host_op in zip(calls, host_ops, strict=True):
    if call.name not in _DEVICE_OPS:
      raise ValueError(f"augmentation op {call.text!r} has no device version; device ops: "
                       f"{sorted(_DEVICE_OPS)}")
    ops.append(_DEVICE_OPS[call.name](**_host_arguments(host_op)))
  if calls[-1].name != "normalize":
    ops.append(_normalize(tuple(mean), tuple(std)))
  return tuple(ops)


def _host_arguments(host_op: Callable) -> dict[str, Any]:
  # Every host builder returns a functools.partial of a function of (image, rng); its keywords are
  # the op's resolved arguments (e.g. color_jitter's strength already turned into four strengths).
  if not isinstance(host_op, functools.partial):
    raise TypeError(f"host op {host_op!r} is not a functools.partial; its arguments cannot be read")
  return dict(host_op.keywords)


def apply_ops(ops: Sequence[DeviceOp], images: jax.Array, key: jax.Array) -> jax.Array:
  """Runs ``ops`` in order on a uint8 or float (B, H, W, C) batch; each op gets its own key."""
  out = images.astype(jnp.float32)
  for op, op_key in zip(ops, jax.random.split(key, len(ops)), strict=True):
    out = op.apply(out, op.sample(op_key, images.shape[0]))
  return out


def build_device_augmentation(data_config) -> Optional[Callable[[dict, jax.Array], dict]]:
  """``augment(batch, rng) -> batch`` that finishes every view on the device, or None on the host.

  None when ``config.data.augment_on='host'``. Otherwise the function replaces each uint8 view of
  the batch ('image', or 'view_0', 'view_1', ...; other keys pass through) by the float32 result of
  its spec's device part (``split_spec``) and a normalize with ``config.data.mean`` and ``std``
  (unless the spec ends with its own). View ``i`` draws from ``jax.random.fold_in(rng, i)``. Pure
  and jittable: call it inside the jitted step.

  Raises:
    ValueError: naming ``config.data.augment_on`` or the view's spec (``config.data.augmentation``
      or ``config.data.views[i]``) when it is bad, has an op without a device version, or fails on
      images with ``config.data.channels`` channels. Nothing is compiled.
  """
  augment_on = data_config.get("augment_on", "host")
  if augment_on not in AUGMENT_ON:
    raise ValueError(f"config.data.augment_on={augment_on!r} is invalid; expected one of "
                     f"{AUGMENT_ON}")
  if augment_on == "host":
    return None
  chains = {}
  for batch_key, (config_key, spec) in views.view_specs(data_config).items():
    chains[batch_key] = _build_checked(data_config, f"config.data.{config_key}={spec!r}", spec)

  def augment(batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
    out = dict(batch)
    for index, (batch_key, ops) in enumerate(chains.items()):
      out[batch_key] = apply_ops(ops, batch[batch_key], jax.random.fold_in(rng, index))
    return out

  return augment


def _build_checked(data_config, where: str, spec: str) -> tuple[DeviceOp, ...]:
  try:
    host_spec, device_spec = split_spec(spec)
    size = transforms.build_augmentation(host_spec).output_size
    ops = build_device_ops(device_spec, mean=tuple(data_config.mean), std=tuple(data_config.std))
  except ValueError as e:
    raise ValueError(f"{where} is invalid: {e}") from None
  # Tracing (not compiling) a batch of the crop's shape catches ops that do not fit the data's
  # channels or the crop's size.
  channels = data_config.channels
  probe = jax.ShapeDtypeStruct((2, size, size, channels), jnp.uint8)
  try:
    out = jax.eval_shape(functools.partial(apply_ops, ops), probe, jax.random.key(0))
  except Exception as e:  # pylint: disable=broad-except; re-raised naming the config key
    raise ValueError(f"{where} fails on the device on {channels}-channel images "
                     f"(config.data.channels={channels}): {type(e).__name__}: {e}") from None
  if out.shape != probe.shape:
    raise ValueError(f"{where} turns {channels}-channel images into shape {out.shape[1:]} on the "
                     f"device, not {probe.shape[1:]} (config.data.channels={channels})")
  return ops
