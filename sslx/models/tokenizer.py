"""BEiT's visual tokenizer: a convolutional autoencoder with a discrete bottleneck.

    images (B, H, W, C) --ConvEncoder /f--> (B, h, w, D or K) --quantiser--> codes --ConvDecoder xf--> pixels

``f = 2^n`` (``downsample``) makes the token grid ``h x w = H/f x W/f``; BEiT needs it to equal its ViT's
patch grid (112 px / 8 = 224 px / 16 = 14). Two quantisers:

- `EMAQuantizer` (VQ-VAE, van den Oord et al. 2017, with the moving-average codebook of its appendix): the
  encoder emits ``D``-dim vectors ``z``, each replaced by its nearest codebook vector ``e_k``; the decoder's
  gradient passes to ``z`` unchanged (straight-through, `straight_through`); the encoder is pulled towards its
  codes by `commitment_loss`; the codebook follows the encoder outputs by `ema_update` (no optimizer). The
  codebook and its moving sums are the non-param collection ``'codebook'`` (`CODEBOOK`), carried by the loop
  as BatchNorm statistics are, so ``{'params', 'codebook'}`` are the tokenizer's whole variables.
- Gumbel-softmax (the dVAE of DALL-E, Ramesh et al. 2021; ``quantizer=None`` in `Tokenizer`): the encoder
  emits ``K`` logits per position; training decodes a relaxed one-hot sample (`gumbel_softmax`), evaluation
  the one-hot argmax; the decoder's first 1x1 convolution (``decoder/embed``) is the codebook embedding. The
  KL to the uniform prior (`kl_to_uniform`) is the method's loss term.

`token_ids` is the deterministic map images -> ``(B, h, w)`` int32 that BEiT's targets come from.

Sharding: with ``config.parallel.fsdp > 1`` the kernels and biases of the ``width``-wide convolutions split
their output channels over the ``'fsdp'`` mesh axis (logical axis ``'conv_out'``, as a ResNet's). The other
outputs (a `ResBlock`'s bottleneck, the codes or logits, the pixels) name no logical axis and stay whole on
every device: 1 or 3 pixel channels cannot be split, and a bottleneck of half the width need not divide by
the FSDP width where the width does. So ``width`` is the one size FSDP must divide (checked by
`sslx.methods.tokenizer.validate_config`).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from sslx.models.vit import partitioned

Dtype = Any

CODEBOOK = "codebook"  # the EMA quantiser's collection: embedding, cluster_size, embed_sum
CONV_AXES = (None, None, "conv_in", "conv_out")  # width-wide outputs: split under FSDP
WHOLE_OUT_AXES = (None, None, "conv_in", None)  # the other outputs: whole on every device


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, gain: float = 2.0,
         split_out: bool = True) -> nn.Conv:
  """``kernel x kernel`` convolution with bias, padded so that stride ``s`` divides the size by ``s``
  (kernel 4 stride 2: one pixel each side, as the VQ-VAE's downsampling convolutions). Kernels are drawn
  with variance ``gain / fan_in``: 2 (He) where a ReLU follows, 1 where none does (the codes' embedding and
  the outputs: codes, logits, pixels), 0 for the residual branches' last layers. ``split_out=False`` for an
  output that is not the hidden width: FSDP leaves it whole (see the module docstring)."""
  pad = (kernel - stride) // 2 if stride > 1 else kernel // 2
  init = nn.initializers.zeros
  if gain:
    init = nn.initializers.variance_scaling(gain, "fan_in", "truncated_normal")
  axes = CONV_AXES if split_out else WHOLE_OUT_AXES
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=partitioned(init, axes),
                 bias_init=partitioned(nn.initializers.zeros, axes[-1:]), name=name)


class ResBlock(nn.Module):
  """``x + conv1x1(relu(conv3x3(relu(x))))`` with a bottleneck of half the width (VQ-VAE's residual block).

  The 1x1 convolution starts at zero, so that each block starts as the identity (as ResNets' zero-initialised
  last BatchNorm): the encoder's outputs then start at about unit scale, where the codebook is drawn, however
  many blocks there are."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = conv(max(width // 2, 1), 3, self.dtype, "conv1", split_out=False)(nn.relu(x))
    return x + conv(width, 1, self.dtype, "conv2", gain=0.0)(nn.relu(y))


class ConvEncoder(nn.Module):
  """``num_downsamples`` 4x4 stride-2 convolutions, a 3x3 convolution, ``num_res_blocks`` `ResBlock`s, then a
  1x1 convolution to ``out_dim`` per position (code vectors, or logits over the vocabulary).

  Returns ``(out, aux)`` as sslx encoders do: ``out`` ``(B, h, w, out_dim)``; ``aux['pooled']`` the mean over
  positions of the last hidden map ``(B, width)`` (what `sslx.methods.Method.embed` reads: the
  vocabulary-sized logits of a dVAE are no representation to probe), ``aux['feature_map']`` that map.
  """
  width: int
  num_downsamples: int
  num_res_blocks: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train  # no dropout, no BatchNorm: the same in both modes
    x = images.astype(self.dtype)
    for i in range(self.num_downsamples):
      x = nn.relu(conv(self.width, 4, self.dtype, f"down_{i}", stride=2)(x))
    x = conv(self.width, 3, self.dtype, "conv_in")(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.dtype, name=f"res_{i}")(x)
    hidden = nn.relu(x)
    out = conv(self.out_dim, 1, self.dtype, "to_codes", gain=1.0, split_out=False)(hidden)
    pooled = jnp.mean(hidden, axis=(1, 2))
    return out, dict(pooled=pooled, feature_map=hidden)


class ConvDecoder(nn.Module):
  """The encoder mirrored: a 1x1 convolution from the codes (``embed``: a dVAE's codebook embedding), a 3x3
  convolution, ``num_res_blocks`` `ResBlock`s, then ``num_upsamples`` times nearest-neighbour x2 and a 3x3
  convolution, the last to ``channels``. Upsampling then convolving avoids the checkerboard patterns of
  strided transposed convolutions. The output is linear: pixels in the pipeline's normalised space."""
  width: int
  num_upsamples: int
  num_res_blocks: int
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, codes, *, train: bool):
    del train
    x = conv(self.width, 1, self.dtype, "embed", gain=1.0)(codes.astype(self.dtype))
    x = conv(self.width, 3, self.dtype, "conv_in")(x)
    for i in range(self.num_res_blocks):
      x = ResBlock(self.dtype, name=f"res_{i}")(x)
    for i in range(self.num_upsamples):
      x = jnp.repeat(jnp.repeat(nn.relu(x), 2, axis=1), 2, axis=2)
      last = i == self.num_upsamples - 1
      x = conv(self.channels if last else self.width, 3, self.dtype, f"up_{i}", gain=1.0 if last else 2.0,
               split_out=not last)(x)
    return x.astype(jnp.float32)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """``argmin_k ||z_n - e_k||^2`` for rows ``z`` ``(N, D)`` and ``codebook`` ``(K, D)``: ``(N,)`` int32.

  The distances are expanded as ``||z||^2 - 2 z.e + ||e||^2`` (one matmul, no ``(N, K, D)`` array); float32
  at highest matmul precision, so that the ids do not depend on the accelerator's default precision.
  """
  z, codebook = z.astype(jnp.float32), codebook.astype(jnp.float32)
  cross = jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
  distances = jnp.sum(z * z, -1, keepdims=True) - 2.0 * cross + jnp.sum(codebook * codebook, -1)
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def straight_through(z: jax.Array, quantized: jax.Array) -> jax.Array:
  """``z + sg(e - z)``: the value of the codes ``e``, the gradient of the identity to ``z``."""
  return z + jax.lax.stop_gradient(quantized - z)


def commitment_loss(z: jax.Array, quantized: jax.Array) -> jax.Array:
  """The VQ-VAE's commitment term, ``(1 / (N D)) sum_n ||z_n - sg(e_{k(n)})||^2`` (mean over positions and
  channels, as sonnet's ``VectorQuantizerEMA``): it pulls the encoder towards its codes; the codebook itself
  moves by `ema_update`, so the paper's codebook term ``||sg(z) - e||^2`` has no place here."""
  return jnp.mean(jnp.square(z.astype(jnp.float32) - jax.lax.stop_gradient(quantized.astype(jnp.float32))))


def ema_update(cluster_size, embed_sum, z, ids, *, decay: float, epsilon: float):
  """One moving-average step of the codebook (VQ-VAE appendix; Razavi et al. 2019):

      n_k = #{n : k(n) = k},   s_k = sum_{n : k(n) = k} z_n
      N_k <- gamma N_k + (1 - gamma) n_k,   m_k <- gamma m_k + (1 - gamma) s_k
      e_k = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)

  ``z`` ``(N, D)`` float32 rows (no gradient), ``ids`` ``(N,)`` their codes; ``cluster_size`` ``N`` ``(K,)``
  and ``embed_sum`` ``m`` ``(K, D)``. The smoothing keeps a code nobody chose from dividing by 0. Over a batch
  sharded under ``jit`` the sums are those of the global batch. Returns ``(N, m, e)``.
  """
  num_codes = cluster_size.shape[0]
  counts = jnp.zeros((num_codes,), jnp.float32).at[ids].add(1.0)
  sums = jax.ops.segment_sum(z.astype(jnp.float32), ids, num_segments=num_codes)
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
  return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_dead_codes(cluster_size, embed_sum, embedding, z, key, *, threshold: float):
  """Codes whose moving count ``N_k`` fell below ``threshold`` restart at a random row of ``z`` (this batch's
  encoder outputs), with ``N_k = threshold`` and ``m_k = threshold z``, so that ``e_k = m_k / N_k`` is that
  row. A restarted code survives the next update only if it is chosen ``threshold`` times per step on
  average, as Jukebox's restarts (Dhariwal et al. 2020); without them the codes the encoder never reaches stay
  unused. Returns ``(N, m, e)``."""
  dead = cluster_size < threshold
  rows = z[jax.random.randint(key, (cluster_size.shape[0],), 0, z.shape[0])].astype(jnp.float32)
  cluster_size = jnp.where(dead, threshold, cluster_size)
  embed_sum = jnp.where(dead[:, None], threshold * rows, embed_sum)
  return cluster_size, embed_sum, jnp.where(dead[:, None], rows, embedding)


class EMAQuantizer(nn.Module):
  """Nearest-code quantiser whose codebook (``K x D``) follows the encoder by moving averages.

  Variables (collection `CODEBOOK`): ``embedding`` ``e`` ``(K, D)``, drawn from ``N(0, 1)`` (the scale at
  which `ConvEncoder` starts its outputs); ``cluster_size`` ``N`` ``(K,)`` and ``embed_sum`` ``m`` ``(K, D)``,
  started at ``N = 1``, ``m = e``: as if each code had been chosen once by itself, so ``e = m / N`` holds from
  the start and an unused code keeps its place for ~``ln(eps) / ln(gamma)`` steps before decaying. In training
  (``train=True``, the collection mutable) one `ema_update`, then, with ``dead_code_threshold > 0``,
  `restart_dead_codes` (rng ``'codebook'``); quantisation uses the codebook the step started from.
  """
  vocab_size: int
  code_dim: int
  decay: float = 0.99
  epsilon: float = 1e-5
  dead_code_threshold: float = 0.0

  def setup(self):
    shape = (self.vocab_size, self.code_dim)
    self.embedding = self.variable(
        CODEBOOK, "embedding",
        lambda: jax.random.normal(self.make_rng("params"), shape, jnp.float32))
    self.cluster_size = self.variable(CODEBOOK, "cluster_size",
                                      lambda: jnp.ones((self.vocab_size,), jnp.float32))
    self.embed_sum = self.variable(CODEBOOK, "embed_sum", lambda: self.embedding.value)

  def __call__(self, z, *, train: bool) -> dict:
    """``z`` ``(B, h, w, D)`` -> ``quantized`` (straight-through, float32), ``ids`` ``(B, h, w)`` and
    ``commitment``."""
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.code_dim)
    ids = nearest_codes(flat, self.embedding.value)
    quantized = self.embedding.value[ids].reshape(z.shape)
    if train and not self.is_initializing():
      self._update(jax.lax.stop_gradient(flat), ids)
    return dict(quantized=straight_through(z, quantized), ids=ids.reshape(z.shape[:-1]),
                commitment=commitment_loss(z, quantized))

  def ids(self, z):
    return nearest_codes(z.reshape(-1, self.code_dim), self.embedding.value).reshape(z.shape[:-1])

  def _update(self, flat, ids) -> None:
    state = ema_update(self.cluster_size.value, self.embed_sum.value, flat, ids, decay=self.decay,
                       epsilon=self.epsilon)
    if self.dead_code_threshold > 0:
      state = restart_dead_codes(*state, flat, self.make_rng(CODEBOOK), threshold=self.dead_code_threshold)
    self.cluster_size.value, self.embed_sum.value, self.embedding.value = state


def gumbel_softmax(key, logits, temperature, *, hard: bool = False) -> jax.Array:
  """A relaxed one-hot sample (Jang et al. 2017; Maddison et al. 2017) over the last axis:

      y = softmax((l + g) / tau),   g_k = -log(-log u_k),   u_k ~ U(0, 1)

  With ``hard`` the value is ``one_hot(argmax y)`` and the gradient that of ``y``:
  ``one_hot + (y - sg(y))``."""
  logits = logits.astype(jnp.float32)
  y = jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape, jnp.float32)) / temperature, axis=-1)
  if not hard:
    return y
  one_hot = jax.nn.one_hot(jnp.argmax(y, axis=-1), logits.shape[-1], dtype=jnp.float32)
  # The bracket is exactly 0 in value, so the sample is exactly one-hot ((1 + y) - y need not be 1).
  return one_hot + (y - jax.lax.stop_gradient(y))


def kl_to_uniform(logits) -> jax.Array:
  """``KL(q || U) = sum_k q_k log q_k + log K``, ``q = softmax(logits)``, averaged over positions (nats): the
  dVAE's prior term, 0 when the encoder is undecided, ``log K`` when it is certain."""
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_position = jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + jnp.log(float(logits.shape[-1]))
  return jnp.mean(per_position)


def code_statistics(ids, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """``(usage, perplexity)`` of the codes ``ids`` (any shape): the fraction of the ``K`` codes chosen at least
  once, and ``exp(-sum_k p_k log p_k)`` of their frequencies ``p`` (``K`` when all are equally used, 1 when
  one code takes everything)."""
  counts = jnp.zeros((vocab_size,), jnp.float32).at[ids.reshape(-1)].add(1.0)
  p = counts / ids.size
  return jnp.mean(counts > 0), jnp.exp(-jnp.sum(jax.scipy.special.xlogy(p, p)))


class Tokenizer(nn.Module):
  """Encoder -> quantiser -> decoder. ``quantizer`` None: Gumbel-softmax, the encoder emitting logits.

  Variables: ``params`` ``{'encoder', 'decoder'}``, and with an `EMAQuantizer` the collection `CODEBOOK`
  ``{'quantizer': {'embedding', 'cluster_size', 'embed_sum'}}``.
  """
  encoder: ConvEncoder
  decoder: ConvDecoder
  quantizer: Optional[EMAQuantizer] = None

  def __call__(self, images, *, train: bool, temperature: float = 1.0, hard: bool = False) -> dict:
    """Encodes, quantises and decodes ``images`` ``(B, H, W, C)``.

    Returns ``reconstruction`` ``(B, H, W, C)`` float32, ``ids`` ``(B, h, w)`` int32 (the nearest code, or the
    argmax of the logits), ``pre_quantization`` ``(B, h, w, D or K)`` float32, and ``commitment`` (VQ). In
    training the dVAE decodes `gumbel_softmax` samples at ``temperature`` (rng ``'gumbel'``; ``hard``:
    straight-through one-hot), in evaluation the one-hot ids.
    """
    out, _ = self.encoder(images, train=train)
    out = out.astype(jnp.float32)
    if self.quantizer is not None:
      quantized = self.quantizer(out, train=train)
      codes, ids, extra = quantized["quantized"], quantized["ids"], {"commitment": quantized["commitment"]}
    else:
      ids, extra = jnp.argmax(out, axis=-1).astype(jnp.int32), {}
      if train:
        codes = gumbel_softmax(self.make_rng("gumbel"), out, temperature, hard=hard)
      else:
        codes = jax.nn.one_hot(ids, out.shape[-1], dtype=jnp.float32)
    reconstruction = self.decoder(codes, train=train)
    return dict(reconstruction=reconstruction, ids=ids, pre_quantization=out, **extra)

  def ids(self, images):
    """``(B, h, w)`` int32 token ids of ``images``; reads only the encoder (and the codebook)."""
    out, _ = self.encoder(images, train=False)
    out = out.astype(jnp.float32)
    if self.quantizer is not None:
      return self.quantizer.ids(out)
    return jnp.argmax(out, axis=-1).astype(jnp.int32)


def token_ids(module: Tokenizer, variables, images) -> jax.Array:
  """The tokens BEiT predicts: ``(B, h, w)`` int32 for ``images`` ``(B, H, W, C)`` normalised as the tokenizer
  run's data were. Deterministic (no sampling, no update) and without gradient. ``variables`` needs only
  ``params['encoder']`` and, for the VQ tokenizer, the `CODEBOOK` collection."""
  return jax.lax.stop_gradient(module.apply(variables, images, method=Tokenizer.ids))
