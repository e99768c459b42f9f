"""Undecodable files in an image folder: training skips and reports them, evaluation masks them.

The folder (written here) has a truncated JPEG among the cats and a text file named .jpg among the
dogs, in both splits. With 20 training files and batches of 8, batches 2 and 4 straddle epoch ends,
so the per-epoch report must attribute each row of a batch to its own epoch.
"""
import os

import numpy as np
from PIL import Image
import pytest

from sslx.data import pipeline
from sslx.data import transforms

BATCH = 8
NUM_GOOD = {"train": 9, "test": 3}  # per class


def write_jpeg(path, rng):
  # A gradient plus noise decodes to varied pixels, so substitutes are distinguishable images.
  height, width = rng.integers(10, 20, size=2)
  ramp = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0, 1, 3)
  noise = rng.normal(0, 20, (height, width, 3))
  Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split, count in NUM_GOOD.items():
    for name in ("cat", "dog"):
      os.makedirs(root / split / name)
      for i in range(count):
        write_jpeg(root / split / name / f"{name}{i}.jpg", rng)
    write_jpeg(root / split / "cat" / "whole.jpg", rng)
    data = (root / split / "cat" / "whole.jpg").read_bytes()
    os.remove(root / split / "cat" / "whole.jpg")
    (root / split / "cat" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / split / "dog" / "text.jpg").write_text("not an image\n")
  return str(root)


def bad_paths(data_dir, split):
  return sorted([os.path.join(data_dir, split, "cat", "truncated.jpg"),
                 os.path.join(data_dir, split, "dog", "text.jpg")])


@pytest.fixture
def config(data_dir):
  return pipeline.default_data_config(source="folder", dataset="toy", data_dir=data_dir,
                                      image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)


def epoch_reports(caplog):
  """The training loader's warnings, in order."""
  return [r.getMessage() for r in caplog.records
          if r.levelname == "WARNING" and "of the training data" in r.getMessage()]


def run_epochs(config, num_batches, caplog):
  caplog.clear()
  loader = pipeline.make_train_loader(config, global_batch_size=BATCH, seed=0)
  try:
    batches = [next(loader) for _ in range(num_batches)]
  finally:
    loader.close()
  return loader, batches, epoch_reports(caplog)


def test_training_skips_and_reports_bad_files_once_per_epoch(config, data_dir, caplog):
  pipeline.validate_data_config(config)
  num_examples = 2 * NUM_GOOD["train"] + 2
  # 8 batches of 8 read 64 positions: 3 whole epochs of 20 and the start of a 4th.
  loader, batches, reports = run_epochs(config, 8, caplog)
  assert loader.num_examples == num_examples
  for batch in batches:
    assert set(batch) == {"image", "label"}  # the bad-file fields never reach the model
    assert batch["image"].shape == (BATCH, 8, 8, 3) and np.isfinite(batch["image"]).all()
    assert set(batch["label"].tolist()) <= {0, 1}
  expected = bad_paths(data_dir, "train")
  assert len(reports) == 3
  for epoch, report in enumerate(reports, start=1):
    assert report.startswith(f"Epoch {epoch} of the training data: skipped 2 undecodable file(s)")
    for path in expected:
      assert report.count(f"{path}: ") == 1
  assert sorted(loader.bad_files) == expected and loader.num_bad_files == 2
  truncated, text = (loader.bad_files[path] for path in expected)  # cat/... sorts first
  assert "truncated" in truncated.lower() and text.startswith("UnidentifiedImageError")


def test_worker_processes_give_the_same_batches_and_reports(config, caplog):
  _, reference, reference_reports = run_epochs(config, 6, caplog)
  config.num_workers = 2
  loader, batches, reports = run_epochs(config, 6, caplog)
  assert len(batches) == len(reference)
  for batch, expected in zip(batches, reference, strict=True):
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], expected[key])
  assert reports == reference_reports and len(reports) == 2 and loader.num_bad_files == 2


def test_processes_report_each_bad_file_under_its_own_epoch(config, data_dir, caplog):
  """Two processes split each batch of 8 into two blocks of 4 rows; together they report every bad file once
  per epoch, however the blocks fall across the epoch ends."""
  reported = {}  # epoch -> bad files reported for it by either process
  for process_index in range(2):
    caplog.clear()
    loader = pipeline.make_train_loader(config, global_batch_size=BATCH, seed=0, process_index=process_index,
                                        process_count=2)
    try:
      for _ in range(8):
        next(loader)
    finally:
      loader.close()
    for report in epoch_reports(caplog):
      epoch = int(report.split()[1])
      reported.setdefault(epoch, []).extend(path for path in bad_paths(data_dir, "train") if f"{path}: " in report)
  assert {epoch: sorted(paths) for epoch, paths in reported.items()} == {
      epoch: bad_paths(data_dir, "train") for epoch in (1, 2, 3)}


def test_resume_is_exact_and_reports_the_rest_of_the_epoch(config, data_dir, caplog):
  _, reference, reference_reports = run_epochs(config, 8, caplog)
  caplog.clear()
  loader = pipeline.make_train_loader(config, global_batch_size=BATCH, seed=0)
  loader.set_state({"next_batch": 2, "seed": 0, "global_batch_size": BATCH,
                    "num_examples": 2 * NUM_GOOD["train"] + 2})
  for expected in reference[2:]:
    batch = next(loader)
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], expected[key])
  reports = epoch_reports(caplog)
  # Epoch 1 (positions 0-19) was mostly read before the resume point (position 16): its report is
  # marked as partial. Epochs 2 and 3 were read whole and are reported as without the interruption.
  assert len(reports) == 3
  assert "(from batch 2 on, where this loader resumed)" in reports[0]
  assert reports[1:] == reference_reports[1:]


def test_evaluation_masks_bad_files_out_and_reports_them(config, data_dir, caplog):
  loader = pipeline.make_eval_loader(config, split="test", batch_size=4)
  num_files = 2 * NUM_GOOD["test"] + 2
  assert len(loader) == 2 and loader.num_examples == num_files
  caplog.clear()
  batches = list(loader)
  for batch in batches:
    assert set(batch) == {"image", "label", "mask"} and batch["image"].shape == (4, 8, 8, 3)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  # Sorted files: cat0-2, truncated (cat), then dog0-2, text (dog).
  bad_rows = [3, 7]
  np.testing.assert_array_equal(mask, ~np.isin(np.arange(num_files), bad_rows))
  np.testing.assert_array_equal(labels, [0, 0, 0, -1, 1, 1, 1, -1])
  blank = transforms.normalize(np.zeros((8, 8, 3), np.uint8), config.mean, config.std)
  for row in bad_rows:
    np.testing.assert_array_equal(images[row], blank)
  assert sorted(loader.bad_files) == bad_paths(data_dir, "test")
  reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluation")]
  assert len(reports) == 1 and "2 undecodable file(s) left out" in reports[0]
  for path in bad_paths(data_dir, "test"):
    assert reports[0].count(f"{path}: ") == 1
