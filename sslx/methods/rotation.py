"""RotNet (Gidaris, Singh & Komodakis, 2018): learn features by predicting which way up an image was turned.

Inputs: every step turns each image of the batch by 0, 90, 180 and 270 degrees (`sslx.pretext.rotation`,
counter-clockwise, ``np.rot90``'s direction), so the ``B`` images become ``4B`` inputs, labelled ``k`` for
``k`` quarter turns, all four copies of an image in the same batch (RotNet's finding: better than one random
rotation per image). They go through the encoder as one pass, so BatchNorm normalises over all ``4B``.

Prediction and loss: a linear layer (``hidden_dim=None``) or an MLP with one hidden ReLU layer on the
encoder's pooled features gives 4 logits ``z``; the loss is the mean softmax cross-entropy over the ``4B``
inputs (`classification_loss`), logged with the rotation top-1 accuracy.

The view: the method takes the data pipeline's one augmented image (``config.data.augment`` or
``config.data.augmentation``) and rotates it on the device. The recipes use RotNet's ImageNet view, a random
resized crop and a horizontal flip (a flip keeps which way is up).

Evaluation (`Method.embed`): the encoder's pooled features of the whole, upright image in evaluation mode
(``aux['pooled']``), which the kNN and linear-probe commands read. The encoder is what the pretext task
trains; the 4-way head only says which way up an image is, nothing about its class; and an upright image is
one of the four inputs of every training step, so evaluation images are inputs the encoder was trained on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx import models
from sslx.methods import Method, RunLength, apply_train, online_encoder
from sslx.models import heads
from sslx.models import vit
from sslx.pretext import rotation

KERNEL_AXES = ("embed", "mlp")


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and top-1 accuracy of ``(M, K)`` logits against ``(M,)`` int labels, float32:

    ``loss = -(1/M) sum_m log p_m[y_m]``,  ``log p_m[k] = z_mk - log sum_j exp(z_mj)``,
    ``top1 = (1/M) #{m : argmax_k z_mk = y_m}`` (ties go to the lowest class).
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
  top1 = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, top1


class ClassifierMLP(nn.Module):
  """Dense ReLU layers of ``hidden_dims`` (dropout after each when ``dropout_rate``), then a linear layer to
  ``num_classes`` logits; float32 throughout. Layers ``hidden_{i}`` and ``logits``."""
  num_classes: int
  hidden_dims: Sequence[int] = ()
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, features, *, train: bool):
    x = features.astype(jnp.float32)
    for i, width in enumerate(self.hidden_dims):
      x = nn.relu(dense_layer(width, KERNEL_AXES, f"hidden_{i}")(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense_layer(self.num_classes, ("mlp", None), "logits")(x)


def dense_layer(width: int, axes: tuple, name: str) -> nn.Dense:
  """A float32 dense layer (LeCun-normal kernel, zero bias) with logical axes ``axes`` for its kernel."""
  return nn.Dense(width, dtype=jnp.float32, param_dtype=jnp.float32,
                  kernel_init=vit.partitioned(nn.initializers.lecun_normal(), axes),
                  bias_init=vit.partitioned(nn.initializers.zeros, axes[1:]), name=name)


class RotationNet(nn.Module):
  """The encoder and the rotation head on its pooled features: ``(B, H, W, C) -> (B, 4)`` logits.
  Variables: ``{'encoder': ..., 'head': ...}``."""
  encoder: nn.Module
  head: ClassifierMLP

  def __call__(self, images, *, train: bool):
    _, aux = self.encoder(images, train=train)
    return self.head(aux["pooled"], train=train)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of RotNet: a linear head on the pooled features."""
  return ml_collections.ConfigDict(dict(name="rotation", hidden_dim=placeholder(int)))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or ``config.model.bn_groups``)."""
  config_lib.check_section_keys(config.method, default_config(), "method", "RotNet")
  config_lib.check_int(config.method.hidden_dim, "method.hidden_dim", none_means="a linear head")
  heads.check_bn_groups(config, rotation.NUM_ROTATIONS * config.batch_size,
                        f"the 4 rotations of config.batch_size={config.batch_size} images")


def hidden_dims(hidden_dim: Optional[int]) -> tuple[int, ...]:
  return () if hidden_dim is None else (int(hidden_dim),)


def model_from_config(config) -> RotationNet:
  head = ClassifierMLP(rotation.NUM_ROTATIONS, hidden_dims(config.method.hidden_dim))
  return RotationNet(models.encoder_from_config(config.model), head)


def build(config, run_length: RunLength) -> Method:
  """The RotNet bundle; reads ``config.method.hidden_dim``."""
  del run_length  # no schedule of its own
  model = model_from_config(config)
  embed, encoder_variables = online_encoder(model.encoder)

  def init(rng, batch):
    return dict(model.init({"params": rng}, batch["image"], train=False)), {}

  def loss_fn(variables, method_state, batch, rng):
    inputs, labels = rotation.rotation_batch(batch["image"])
    logits, model_state = apply_train(model, variables, inputs, rngs={"dropout": rng})
    loss, top1 = classification_loss(logits, labels)
    return loss, ({"loss": loss, "rotation_top1": top1}, method_state, model_state)

  return Method(name="rotation", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables)
