r"""Attention maps of a ViT run's encoder, as a PNG:

  python -m sslx.attention_maps --workdir=runs/quickstart --out=attn.png [--num_images=8] [--data_dir=DIR]

One row per image: the image, then, for each head of the encoder's last block, the class token's attention
over the patch grid (`sslx.models.attention_weights.cls_attention_maps`) as a heat map over it
(`sslx.viz.save_attention_grid`). The encoder is the one the run's method stands for (`Method.encoder_variables`,
as the evaluation commands read it, from the newest checkpoint); the images are the first ``num_images`` of
the run's held-out split (its training split where it has none), with the evaluation transform: the images
the run's own pictures show.
"""
from __future__ import annotations

import functools
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from sslx import init_from
from sslx import models
from sslx import viz
from sslx.data import pipeline
from sslx.evaluate import run
from sslx.models import attention_weights


def _check_vit_run(run_dir: str, run_config) -> None:
  """Raises a ValueError naming the run's encoder unless it is a ViT."""
  name = run_config.model.get("name", "vit")
  if name != "vit":
    raise ValueError(f"The run in {run_dir!r} trained config.model.name={name!r} (variant "
                     f"{run_config.model.get('variant')!r}), not a ViT: attention maps need one")


def write_attention_maps(run_dir: str, out: str, num_images: int = 8, data_dir=None) -> str:
  """Writes the PNG of ``run_dir``'s encoder on ``num_images`` images to ``out`` and returns ``out``."""
  _check_vit_run(run_dir, init_from.load_run_config(run_dir))  # before a checkpoint is read
  run_config, method, (variables, method_state) = run.restored_run(run_dir)
  data_config = run_config.data
  if data_dir is not None:
    data_config.data_dir = data_dir
  images = pipeline.make_viz_batch(data_config, num_images)["image"]
  encoder = models.encoder_from_config(run_config.model)
  maps = jax.jit(functools.partial(attention_weights.cls_attention_maps, encoder))(
      method.encoder_variables(variables, method_state), images)
  pictures = viz.denormalize(images, data_config.mean, data_config.std)
  return viz.save_attention_grid(out, pictures, np.asarray(jax.device_get(maps)))


def _command_line() -> None:
  """Defines the flags and runs. Defined here rather than at import, so that a process importing this module
  beside sslx.main (a test, a notebook) does not define --workdir twice."""
  workdir = flags.DEFINE_string("workdir", None, "The --workdir of an sslx run whose encoder is a ViT.")
  out = flags.DEFINE_string("out", None, "Where to write the PNG.")
  num_images = flags.DEFINE_integer("num_images", 8, "Images (rows) to show.", lower_bound=1)
  data_dir = flags.DEFINE_string("data_dir", None, "Where the run's data set lives, if not where its config says.")
  flags.mark_flags_as_required(["workdir", "out"])

  def main(argv) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    try:
      path = write_attention_maps(workdir.value, out.value, num_images.value, data_dir.value)
    except (ValueError, FileNotFoundError) as error:  # about the run or its data: the message says it all
      print(f"error: {error}", file=sys.stderr, flush=True)
      sys.exit(1)
    print(f"Attention maps written to {path}", flush=True)

  app.run(main)


if __name__ == "__main__":
  _command_line()
