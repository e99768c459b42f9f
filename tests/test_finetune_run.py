"""Fine-tuning through the one training loop: init_from, held-out evaluation, best checkpoint and
results.json."""
import json
import os

import jax
import numpy as np
import pytest

from sslx import config as config_lib
from sslx import train
from sslx.methods import finetune
from train_helpers import tiny_run_config


def _finetune_config(init_from, **overrides):
  config = finetune.finetune_config(
      tiny_run_config(), num_classes=10, batch_size=16, num_epochs=1, base_lr=1e-3, layer_decay=0.75,
      drop_path_rate=0.1, augmentation="random_resized_crop(28, scale=(1, 1), ratio=(1, 1))|hflip",
      warmup_epochs=0.0)
  config.init_from = init_from
  config.total_steps = 4
  config.eval.every_epochs = 2 / 3750  # every 2 steps: 60k images / batch 16 = 3750 steps per epoch
  config.eval.batch_size = 1000
  config.method.ema_decay = 0.9
  config.update(overrides)
  return config_lib.finalize(config)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 2-step MAE run whose encoder owns a mask token (as SimMIM's and BEiT's do), which MAE never uses."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  state, _ = train.train(tiny_run_config(total_steps=2, **{"model.mask_token": True}), workdir)
  return workdir, state


def test_finetune_starts_from_the_pretrained_encoder_and_keeps_the_best(pretrained, tmp_path, capsys):
  source_dir, source_state = pretrained
  workdir = tmp_path / "finetune"
  config = _finetune_config(source_dir)
  assert not config.model.mask_token  # the classifier's encoder has no mask token ...
  run = train._Run(config, str(workdir))
  initial = run.initial_state()
  source_encoder = dict(source_state.params["encoder"])
  assert source_encoder.pop("mask_token").shape == (1, 1, 32)  # ... the pretrained one has
  jax.tree.map(np.testing.assert_array_equal, initial.params["encoder"], source_encoder)
  # The unused leaf is named, not silently dropped.
  assert (f"encoder initialised from encoder of {source_dir}/checkpoints/2 (ignored, unused here: "
          "params/mask_token)") in capsys.readouterr().out

  state, last = train.train(_finetune_config(source_dir), str(workdir))
  printed = capsys.readouterr().out
  assert "(ignored, unused here: params/mask_token)" in printed
  assert "step 2: eval/" in printed and "step 4: eval/" in printed
  for name in ("eval/top1", "eval/top5", "eval/loss", "eval/ema_top1"):
    assert name in last
  assert 10 < last["eval/top1"] <= 100 and last["eval/top1"] <= last["eval/top5"]
  with open(workdir / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["task"] == "finetune" and results["last"]["eval/top1"] == last["eval/top1"]
  best = results["best"]
  assert best["eval/top1"] >= last["eval/top1"] and os.listdir(workdir / "best") == [str(best["step"])]
  assert int(state.step) == 4 and "mask_token" not in state.params["encoder"]
