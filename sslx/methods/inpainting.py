"""Context encoders (Pathak et al., CVPR 2016): inpaint a missing quarter of the image from its context.

Each step hides a region of every image (`sslx.pretext.regions`: the central quarter, or random blocks
covering exactly a quarter; ``config.method.region``), fills it with the dataset mean (0 after
normalisation), and an encoder-decoder predicts the pixels of the whole image from what is left. The decoder
depends on what the registry encoder exposes:

- ViT: a linear layer maps each patch token (``aux['patch_tokens']``) to the ``p * p * C`` pixels of its
  patch, SimMIM's head; attention already spreads the context to the masked patches' tokens.
- ResNet, which exposes only ``aux['pooled']``: Pathak's bottleneck decoder, a dense layer to a
  ``decoder_width``-channel map of ``H / 2^n`` pixels (``n = decoder_upsamples``), then ``n`` 4 x 4
  transposed convolutions of stride 2 halving the channels, ReLU between, the last one to ``C`` channels
  (no BatchNorm or tanh: the targets are normalised pixels, and the decoder keeps no running statistics).

Loss: `regions.region_l2_loss`, Pathak's L2 over the region and its ``overlap`` px band (weight
``overlap_weight`` there, 1 in the region; the conventions are in `sslx.pretext.regions`). With
``adversarial_weight`` ``lambda > 0`` a small convolutional discriminator ``D`` (3 strided 4 x 4
convolutions with LeakyReLU 0.2, global average, one logit; no BatchNorm) judges the predicted pixels, shown
with everything outside region + band set to 0 (Pathak's D sees only the predicted square), and

  ``L_G = (1 - lambda) L_rec + lambda * softplus(-D(fake))``         (non-saturating, the reference's BCE),
  ``L_D = softplus(-D(real)) + softplus(D(fake))``                    (BCE on real = 1, fake = 0),
  ``loss = L_G + L_D``,

batch means of the softplus terms. One ``loss_fn`` serves both players through stop-gradients: ``L_G``
reads D's parameters through ``stop_gradient`` and ``L_D`` reads the prediction through ``stop_gradient``, so
the gradient of ``loss`` is ``dL_G`` for the encoder and decoder and ``dL_D`` for the discriminator. Pathak's
``lambda`` is 0.001 and its generator's learning rate 10x the discriminator's (``config.optimizer.lr_mults``).

`Method.embed` is the encoder on the whole, unmasked image (evaluation mode, ``aux['pooled']``): the hole is
a training device, and downstream tasks see complete images (Pathak fine-tunes and probes on them).
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx import models
from sslx.methods import Method, RunLength, apply_train, online_encoder, split_variables
from sslx.models import heads
from sslx.models import resnet
from sslx.models import vit
from sslx.models.patches import unpatchify
from sslx.pretext import regions

DISCRIMINATOR = "discriminator"
DISCRIMINATOR_DEPTH = 3
LEAKY_SLOPE = 0.2  # the reference discriminator's LeakyReLU
PIXEL_KERNEL_AXES = (None, None, "conv_in", None)


class PatchPixelHead(nn.Module):
  """ViT decoder: each patch token to its patch's pixels, reassembled as ``(B, H, W, C)``."""
  patch_size: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, aux, image_hw):
    pixels = vit.dense(self.patch_size ** 2 * self.channels, ("embed", "patch"), self.dtype, jnp.float32,
                       "pixels")(aux["patch_tokens"])
    return unpatchify(pixels, self.patch_size, image_hw)


class UpconvDecoder(nn.Module):
  """ResNet decoder from the pooled vector: dense -> ``(H / 2^n, W / 2^n, width)`` -> ``n`` upconvolutions."""
  width: int
  num_upsamples: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, aux, image_hw):
    scale = 2 ** self.num_upsamples
    start = (image_hw[0] // scale, image_hw[1] // scale)
    x = vit.dense(start[0] * start[1] * self.width, heads.KERNEL_AXES, self.dtype, jnp.float32,
                  "project")(aux["pooled"])
    x = nn.relu(x.reshape(-1, *start, self.width))
    for i in range(self.num_upsamples):
      last = i == self.num_upsamples - 1
      features = self.channels if last else max(self.width // 2 ** (i + 1), 1)
      # The pixels' 1 or 3 channels stay whole on every device: FSDP cannot split them.
      kernel_axes, bias_axes = (PIXEL_KERNEL_AXES, (None,)) if last else (resnet.CONV_AXES, resnet.CHANNEL_AXES)
      x = nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype,
                           kernel_init=vit.partitioned(resnet.conv_init, kernel_axes),
                           bias_init=vit.partitioned(nn.initializers.zeros, bias_axes),
                           name=f"upconv_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x


class ContextEncoder(nn.Module):
  """Encoder and decoder: ``(B, H, W, C)`` images -> predicted pixels. Params ``{'encoder', 'decoder'}``."""
  encoder: nn.Module
  decoder: nn.Module

  @nn.compact
  def __call__(self, images, *, train: bool):
    _, aux = self.encoder(images, train=train)
    return self.decoder(aux, images.shape[1:3]).astype(jnp.float32)


class Discriminator(nn.Module):
  """``DISCRIMINATOR_DEPTH`` 4 x 4 stride-2 convolutions (``width``, doubling), LeakyReLU, mean, one logit."""
  width: int

  @nn.compact
  def __call__(self, images):
    x = images
    for i in range(DISCRIMINATOR_DEPTH):
      x = nn.Conv(self.width * 2 ** i, (4, 4), strides=(2, 2), padding="SAME",
                  kernel_init=vit.partitioned(resnet.conv_init, resnet.CONV_AXES),
                  bias_init=vit.partitioned(nn.initializers.zeros, resnet.CHANNEL_AXES), name=f"conv_{i}")(x)
      x = nn.leaky_relu(x, LEAKY_SLOPE)
    logit = vit.dense(1, ("mlp", None), jnp.float32, jnp.float32, "logit")(jnp.mean(x, axis=(1, 2)))
    return logit[:, 0].astype(jnp.float32)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of context encoders: the central quarter, Pathak's 4 px overlap weighted 10x, no
  adversarial loss; a decoder from 4 x 4 x 512 as the reference's (ResNet encoders only)."""
  return ml_collections.ConfigDict(dict(
      name="inpainting", region="center", block_size=16, overlap=4, overlap_weight=10.0,
      adversarial_weight=0.0, discriminator_width=64, decoder_width=512, decoder_upsamples=5))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or ``config.model.bn_groups``)."""
  method, size = config.method, config.data.image_size
  config_lib.check_section_keys(method, default_config(), "method", "context encoder")
  if method.region not in regions.REGIONS:
    raise ValueError(f"config.method.region={method.region!r} is not one of {regions.REGIONS}")
  if method.region == "center" and size % 2:
    raise ValueError(f"config.method.region='center' needs an even config.data.image_size, not {size}: the "
                     "central square of side image_size / 2 must cover exactly a quarter")
  config_lib.check_int(method.block_size, "method.block_size")
  if method.region == "random_blocks" and (size % method.block_size or (size // method.block_size) % 2):
    raise ValueError(f"config.method.block_size={method.block_size} must divide config.data.image_size="
                     f"{size} into an even number of blocks per side, so that exactly a quarter of them is "
                     "missing")
  config_lib.check_int(method.overlap, "method.overlap", 0)
  config_lib.check_number(method.overlap_weight, "method.overlap_weight", lambda v: v > 0, "> 0")
  config_lib.check_number(method.adversarial_weight, "method.adversarial_weight", lambda v: 0 <= v < 1,
                          "in [0, 1)")
  config_lib.check_int(method.discriminator_width, "method.discriminator_width")
  config_lib.check_int(method.decoder_width, "method.decoder_width")
  config_lib.check_int(method.decoder_upsamples, "method.decoder_upsamples")
  if config.model.get("name") == "resnet" and size % 2 ** method.decoder_upsamples:
    upsamples = method.decoder_upsamples
    raise ValueError(f"config.method.decoder_upsamples={upsamples}: 2^{upsamples} does not divide "
                     f"config.data.image_size={size}")
  heads.check_bn_groups(config, config.batch_size, f"config.batch_size={config.batch_size}")


def generator_from_config(config) -> ContextEncoder:
  """The encoder of ``config.model`` and the decoder that suits it (see the module docstring)."""
  encoder = models.encoder_from_config(config.model)
  channels = int(config.data.channels)
  dtype = vit.resolve_dtype(config.model.get("dtype", "auto"))
  if isinstance(encoder, vit.VisionTransformer):
    decoder = PatchPixelHead(encoder.patch_size, channels, dtype)
  else:
    decoder = UpconvDecoder(int(config.method.decoder_width), int(config.method.decoder_upsamples), channels,
                            dtype)
  return ContextEncoder(encoder, decoder)


def build(config, run_length: RunLength) -> Method:
  """The context-encoder bundle."""
  del run_length  # no schedule of its own
  generator = generator_from_config(config)
  method = config.method
  region_kind, block_size = method.region, int(method.block_size)
  overlap, overlap_weight = int(method.overlap), float(method.overlap_weight)
  adversarial_weight = float(method.adversarial_weight)
  discriminator = Discriminator(int(method.discriminator_width)) if adversarial_weight > 0 else None
  embed, encoder_variables = online_encoder(generator.encoder)

  def draw_regions(rng, images):
    batch, height, width, _ = images.shape
    if region_kind == "center":
      return regions.central_region(batch, height, width)
    return regions.random_blocks(rng, batch, height, width, block_size)

  def generator_variables(variables):
    params, model_state = split_variables(variables)
    return {"params": {k: v for k, v in params.items() if k != DISCRIMINATOR}, **model_state}

  def init(rng, batch):
    generator_rng, discriminator_rng = jax.random.split(rng)
    variables = dict(generator.init({"params": generator_rng}, batch["image"], train=False))
    if discriminator is not None:
      critic = discriminator.init({"params": discriminator_rng}, batch["image"])["params"]
      variables["params"] = {**variables["params"], DISCRIMINATOR: critic}
    return variables, {}

  def loss_fn(variables, method_state, batch, rng):
    region_rng, dropout_rng = jax.random.split(rng)
    images = jnp.asarray(batch["image"], jnp.float32)
    region = draw_regions(region_rng, images)
    weights = regions.loss_weights(region, overlap, overlap_weight)
    masked = regions.fill_regions(images, region)
    pred, model_state = apply_train(generator, generator_variables(variables), masked,
                                    rngs={"dropout": dropout_rng})
    reconstruction = regions.region_l2_loss(pred, images, weights)
    metrics = {"reconstruction": reconstruction}
    loss = reconstruction
    if discriminator is not None:
      predicted = (weights > 0)[..., None]
      real, fake = jnp.where(predicted, images, 0.0), jnp.where(predicted, pred, 0.0)
      critic = variables["params"][DISCRIMINATOR]
      judge = lambda params, x: discriminator.apply({"params": params}, x)
      adversarial = jnp.mean(jax.nn.softplus(-judge(jax.lax.stop_gradient(critic), fake)))
      critic_loss = (jnp.mean(jax.nn.softplus(-judge(critic, real)))
                     + jnp.mean(jax.nn.softplus(judge(critic, jax.lax.stop_gradient(fake)))))
      generator_loss = (1.0 - adversarial_weight) * reconstruction + adversarial_weight * adversarial
      loss = generator_loss + critic_loss
      metrics.update(adversarial=adversarial, generator_loss=generator_loss, discriminator_loss=critic_loss)
    metrics["loss"] = loss
    return loss, (metrics, method_state, model_state)

  def visualize(variables, method_state, batch, rng):
    images = jnp.asarray(batch["image"], jnp.float32)
    region = draw_regions(rng, images)
    masked = regions.fill_regions(images, region)
    pred = generator.apply(generator_variables(variables), masked, train=False)
    # An OrderedDict keeps its row order through jit (a plain dict comes back with sorted keys).
    return collections.OrderedDict(masked=masked, inpainted=jnp.where(region[..., None], pred, images),
                                   original=images)

  return Method(name="inpainting", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, visualize=visualize)
