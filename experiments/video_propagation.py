r"""Does tracking emerge? Sprite masks propagated by a video colourisation run, on held-out synthetic videos.

  python experiments/video_propagation.py --config=configs/video_colorization_synthetic.py \
      --workdir=runs/vcol_sprites --out=runs/vcol_sprites/propagation.json

Trains the run in ``--workdir`` (or resumes it, or, when it is finished, just loads its last checkpoint:
`sslx.train.train` does all three), then propagates the sprite masks of frame 0 through ``--num_videos``
held-out videos of ``--num_frames`` frames (the config's 'test' split of `sslx.data.video.synthetic_video`,
which training never reads) with `sslx.pretext.propagation.propagate_video`: frame 0 plus the ``--window``
previous predictions as references, masks averaged over each embedding cell, predictions upsampled
bilinearly to full frames and their argmax compared with the true label maps. Scores per propagation
distance (frames after frame 0: 1, 2, 4, 8 and the mean over 10 and more): pixel accuracy, and the IoU of
each sprite of frame 0 averaged over sprites and videos. Beside the trained embeddings:

- ``copy``: frame 0's masks left in place (what a tracker that never moves scores);
- ``pixels_lab`` / ``pixels_grey``: the same propagation with raw pixels as the features: each cell's
  Lab (or L alone) values, scaled by (100, 128, 128) and flattened, compared by a Gaussian kernel
  (``-|f_i - f_j|^2 / tau``, tau = ``--pixel_temperature``; a dot product would favour bright pixels).
  ``pixels_lab`` sees the colour the network never sees, and the sprites' colours are distinct, so it is a
  strong baseline here.

The JSON holds these tables and the settings. A tiny end-to-end check (a minute on a CPU):
``--config=configs/video_colorization_synthetic.py:test --config.total_steps=20 --num_videos=4``.
"""
from __future__ import annotations

import json
import os
import zlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from sslx import train
from sslx.data import transforms
from sslx.data import video
from sslx.methods import video_colorization
from sslx.pretext import lab
from sslx.pretext import propagation

config_flags.DEFINE_config_file("config", "configs/video_colorization_synthetic.py",
                                "Run config: configs/<file>.py[:arg]; --config.KEY=VALUE overrides")
flags.DEFINE_string("workdir", None, "The run's folder: trained there unless it holds a finished run.",
                    required=True)
flags.DEFINE_string("out", None, "JSON results (default <workdir>/propagation.json).")
flags.DEFINE_integer("num_videos", 32, "Held-out videos.")
flags.DEFINE_integer("num_frames", 16, "Frames per held-out video.")
flags.DEFINE_integer("window", 3, "Previous predicted frames used as references besides frame 0.")
flags.DEFINE_integer("top_k", None, "Keep each pixel's k most similar references (None: all).")
flags.DEFINE_float("temperature", None, "Propagation temperature (None: config.method.temperature).")
flags.DEFINE_float("pixel_temperature", 0.05, "Temperature of the raw-pixel baselines' Gaussian kernel.")
DISTANCES = (1, 2, 4, 8)
FAR = 10  # and over: one averaged column


def held_out_videos(config, num_videos: int, num_frames: int):
  """``(frames uint8 (V, T, S, S, 3), labels int (V, T, S, S))`` of the 'test' split's seed."""
  size = config.data.get("synthetic_image_size") or config.data.image_size
  seed = zlib.crc32(b"test")
  videos = [video.synthetic_video(np.random.default_rng((seed, i)), num_frames, size, config.data.num_sprites)
            for i in range(num_videos)]
  return np.stack([v[0] for v in videos]), np.stack([v[1] for v in videos])


def pixel_features(frames_uint8, grid: tuple[int, int], grey: bool):
  """Raw-pixel features ``(T, h, w, p*p*c)``: each cell's Lab (or L) values, scaled by (100, 128, 128)."""
  lab_frames = np.asarray(lab.rgb_to_lab(frames_uint8.astype(np.float32) / 255.0)) / np.array([100, 128, 128])
  if grey:
    lab_frames = lab_frames[..., :1]
  num_frames, height, width, channels = lab_frames.shape
  rows, cols = grid
  cells = lab_frames.reshape(num_frames, rows, height // rows, cols, width // cols, channels)
  return cells.transpose(0, 1, 3, 2, 4, 5).reshape(num_frames, rows, cols, -1)


def predicted_labels(embeddings, labels, num_labels: int, temperature: float, window: int, top_k,
                     similarity: str = "dot"):
  """Full-resolution label maps ``(T, H, W)`` propagated from ``labels[0]`` over ``embeddings``."""
  rows, cols = embeddings.shape[1:3]
  first = propagation.cell_average(jax.nn.one_hot(labels[0], num_labels), (rows, cols))
  distributions = propagation.propagate_video(jnp.asarray(embeddings), first, temperature=temperature,
                                              window=window, top_k=top_k, similarity=similarity)
  return np.asarray(jnp.argmax(propagation.upsample(distributions, labels.shape[1:3]), axis=-1))


def scores(predicted, labels) -> dict[int, tuple[float, list[float]]]:
  """Per frame ``t >= 1``: (pixel accuracy, IoU of each sprite present in frame 0)."""
  out = {}
  sprites = [k for k in np.unique(labels[0]) if k != 0]
  for t in range(1, len(labels)):
    ious = []
    for k in sprites:
      union = np.sum((predicted[t] == k) | (labels[t] == k))
      ious.append(float(np.sum((predicted[t] == k) & (labels[t] == k)) / union) if union else 1.0)
    out[t] = (float(np.mean(predicted[t] == labels[t])), ious)
  return out


def summarise(per_video: list[dict[int, tuple[float, list[float]]]], num_frames: int) -> dict:
  columns = {str(d): [d] for d in DISTANCES if d < num_frames}
  if num_frames > FAR:
    columns[f"{FAR}+"] = list(range(FAR, num_frames))
  table = {}
  for name, frames in columns.items():
    accuracy = [video_scores[t][0] for video_scores in per_video for t in frames]
    ious = [iou for video_scores in per_video for t in frames for iou in video_scores[t][1]]
    table[name] = {"pixel_accuracy": float(np.mean(accuracy)), "mean_iou": float(np.mean(ious))}
  return table


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  config = f.config
  if config.data.source != "synthetic_video":
    raise app.UsageError(f"config.data.source={config.data.source!r}: this experiment scores synthetic videos")
  state, last = train.train(config, f.workdir)
  variables, method_state = jax.device_get((state.variables, state.method_state))
  del method_state  # the colour clusters: not needed to propagate labels
  embed = jax.jit(video_colorization.frame_embedder(config))
  temperature = f.temperature or float(config.method.temperature)
  frames, labels = held_out_videos(config, f.num_videos, f.num_frames)
  num_labels = config.data.num_sprites + 1
  grid = video_colorization.feature_grid(config)
  per_video = {name: [] for name in ("colorization", "copy", "pixels_lab", "pixels_grey")}
  for clip, clip_labels in zip(frames, labels, strict=True):
    normalised = transforms.normalize(clip, tuple(config.data.mean), tuple(config.data.std))
    per_video["colorization"].append(scores(predicted_labels(
        embed(variables, normalised), clip_labels, num_labels, temperature, f.window, f.top_k), clip_labels))
    per_video["copy"].append(scores(np.repeat(clip_labels[:1], len(clip_labels), axis=0), clip_labels))
    for name, grey in (("pixels_lab", False), ("pixels_grey", True)):
      features = pixel_features(clip, grid, grey)
      per_video[name].append(scores(predicted_labels(
          features, clip_labels, num_labels, f.pixel_temperature, f.window, f.top_k, "neg_sq_dist"), clip_labels))
  results = {
      "workdir": os.path.abspath(f.workdir), "steps": int(state.step), "last_logged": last,
      "settings": {"num_videos": f.num_videos, "num_frames": f.num_frames, "window": f.window, "top_k": f.top_k,
                   "temperature": temperature, "pixel_temperature": f.pixel_temperature, "grid": list(grid),
                   "image_size": config.data.image_size, "num_sprites": config.data.num_sprites},
      "by_distance": {name: summarise(values, f.num_frames) for name, values in per_video.items()},
  }
  out = f.out or os.path.join(f.workdir, "propagation.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as file:
    json.dump(results, file, indent=2)
  for name, table in results["by_distance"].items():
    print(f"{name:>13}: " + " | ".join(f"{d}: acc {v['pixel_accuracy']:.3f} IoU {v['mean_iou']:.3f}"
                                        for d, v in table.items()))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
