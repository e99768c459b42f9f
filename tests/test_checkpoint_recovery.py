"""Checkpoints on storage that fails: damaged steps fall back, failed saves raise once, partial saves go."""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step, width=64):
  # 2 KiB of random float32: more than OCDBT inlines into its index (1 KiB), so the kernel gets a data
  # file of its own, and zstd cannot shrink it.
  kernel = np.random.default_rng(step).standard_normal((8, width), np.float32)
  return {"step": jnp.array(step, jnp.int32), "params": {"dense": {"kernel": jnp.asarray(kernel)}},
          "opt_state": {"mu": jnp.full((8, width), float(step))}}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _saved(tmp_path, steps=(1, 2)) -> str:
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3, async_save=False)
  for step in steps:
    ckpt.save(step, _state(step), {"next_index": step * 10})
  ckpt.close()
  return directory


def _restore_latest(directory, abstract=None, **kwargs):
  """restore_latest with the same params check as train.py; returns its result and the lines it logged."""
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3, async_save=False)
  abstract = _abstract(_state(0)) if abstract is None else abstract
  lines = []
  restored = ckpt.restore_latest(abstract, check_params=lambda step: ckpt.check_params_match(step, abstract["params"]),
                                 log=lines.append, **kwargs)
  return ckpt, restored, lines


def _array_file(step_dir) -> str:
  """The kernel's data file: the largest file of the state's OCDBT database."""
  return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _truncate_array(step_dir):
  path = _array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
  # The zstd frame header: zstd itself notices.
  with open(_array_file(step_dir), "r+b") as f:
    head = f.read(8)
    f.seek(0)
    f.write(bytes(b ^ 0xFF for b in head))


def _flip_weight_bytes(step_dir):
  # Inside the block that zstd stores raw (random floats do not compress) and no orbax checksum covers:
  # the array reads without an error, so only sslx's own checksums notice.
  path = _array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    middle = f.read(8)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0x5A for b in middle))


def test_damaged_weight_bytes_restore_silently_without_checksums(tmp_path):
  """Why the checksums exist: the same damage, read by orbax alone, gives wrong weights and no error."""
  directory = _saved(tmp_path)
  _flip_weight_bytes(os.path.join(directory, "2"))
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  state, _ = ckpt.restore(2, _abstract(_state(0)))
  assert not np.array_equal(np.asarray(state["params"]["dense"]["kernel"]), np.asarray(_state(2)["params"]["dense"]["kernel"]))


def _truncate_data(step_dir):
  os.truncate(os.path.join(step_dir, "data", "metadata"), 5)  # the JSON beside the arrays


def _remove(relative):
  def remove(step_dir):
    path = os.path.join(step_dir, relative)
    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
  return remove


def _assert_restored(restored, step):
  restored_step, state, data = restored
  assert restored_step == step and data == {"next_index": step * 10}
  jax.tree.map(np.testing.assert_array_equal, state, _state(step))


@pytest.mark.parametrize("damage, why", [
    (_truncate_array, "OUT_OF_RANGE"), (_flip_bytes, "ZSTD"),
    (_flip_weight_bytes, "1 of its arrays differ from their saved checksums, e.g. params/dense/kernel"),
    (_remove("state/_METADATA"), "state/_METADATA"),
    (_remove("state"), "state/ directory is missing"), (_remove("data"), "data/ directory is missing"),
    (_truncate_data, "line 1 column")],
    ids=["truncated_array", "flipped_bytes", "flipped_weight_bytes", "no_state_metadata", "no_state_dir", "no_data_dir", "truncated_data"])
def test_damaged_step_falls_back_to_the_one_before(tmp_path, damage, why):
  directory = _saved(tmp_path)
  damage(os.path.join(directory, "2"))
  ckpt, restored, lines = _restore_latest(directory)
  _assert_restored(restored, 1)
  assert len(lines) == 1 and "\n" not in lines[0]
  assert "step 2" in lines[0] and why in lines[0] and f"{directory}/2.corrupt" in lines[0]
  assert "trying step 1" in lines[0]
  assert not os.path.exists(os.path.join(directory, "2"))
  assert os.listdir(os.path.join(directory, "2.corrupt"))  # moved whole, never deleted
  # The manager forgot step 2: the resumed run saves it again, and max_to_keep deletes around the aside copy.
  assert ckpt.all_steps() == [1]
  for step in (2, 3, 4, 5):
    ckpt.save(step, _state(step), {"next_index": step * 10})
  ckpt.close()
  assert ckpt.all_steps() == [3, 4, 5] and os.path.isdir(os.path.join(directory, "2.corrupt"))


def test_a_step_moved_aside_twice_keeps_both_copies(tmp_path):
  directory = _saved(tmp_path)
  os.makedirs(os.path.join(directory, "2.corrupt"))
  _remove("data")(os.path.join(directory, "2"))
  _, restored, lines = _restore_latest(directory)
  _assert_restored(restored, 1)
  assert f"{directory}/2.corrupt.1" in lines[0] and os.listdir(os.path.join(directory, "2.corrupt.1"))


def test_when_no_step_reads_the_error_lists_every_step(tmp_path):
  directory = _saved(tmp_path)
  _truncate_array(os.path.join(directory, "2"))
  _remove("state/_METADATA")(os.path.join(directory, "1"))
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=r"(?s)No checkpoint in .* could be read.*step 2: OUT_OF_RANGE.*step 1: state/_METADATA"):
    _restore_latest(directory)
  assert sorted(os.listdir(directory)) == ["1.corrupt", "2.corrupt"]


def test_nothing_saved_gives_none(tmp_path):
  _, restored, lines = _restore_latest(str(tmp_path / "checkpoints"))
  assert restored is None and lines == []


def test_checkpoint_of_another_model_is_not_moved(tmp_path):
  directory = _saved(tmp_path)
  with pytest.raises(ValueError, match=r"(?s)another model.*dense/kernel: checkpoint \(8, 64\) vs config \(8, 32\)"):
    _restore_latest(directory, abstract=_abstract(_state(0, width=32)))
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_checkpoint_of_another_config_is_not_moved(tmp_path):
  directory = _saved(tmp_path)
  abstract = _abstract(_state(0))
  abstract["opt_state"]["mu"] = jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=abstract["step"].sharding)
  with pytest.raises(ValueError, match=r"(?s)another model.*opt_state.mu: checkpoint \(8, 64\) vs config \(8, 32\)"):
    _restore_latest(directory, abstract=abstract)
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_another_process_failing_to_read_moves_the_step_aside_too(tmp_path):
  directory = _saved(tmp_path)
  answers = iter([False, True])  # the other process could not read step 2, then read step 1
  barriers = []
  _, restored, lines = _restore_latest(directory, all_agree=lambda ok: ok and next(answers), barrier=barriers.append)
  _assert_restored(restored, 1)
  assert "another process" in lines[0] and os.path.isdir(os.path.join(directory, "2.corrupt"))
  assert len(barriers) == 1


def test_only_the_lead_moves_a_step_aside(tmp_path):
  directory = _saved(tmp_path)
  _truncate_array(os.path.join(directory, "2"))

  def barrier(name):  # the lead renames while this process waits here
    assert os.path.isdir(os.path.join(directory, "2"))
    os.rename(os.path.join(directory, "2"), os.path.join(directory, "2.corrupt"))

  _, restored, lines = _restore_latest(directory, is_lead=False, all_agree=lambda ok: ok, barrier=barrier)
  _assert_restored(restored, 1)
  assert f"{directory}/2.corrupt" in lines[0]


# Saves in a process whose files may not grow past 8 KiB, as on a full disk: writes fail with EFBIG.
# Forty arrays, so a save has many writes in flight when the first one fails.
_FULL_STORAGE = textwrap.dedent("""
    import resource, signal, sys, time
    import jax.numpy as jnp, numpy as np
    from sslx import checkpoint
    directory, mode = sys.argv[1:]
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=3, async_save=mode == "async")
    state = {f"w{i}": jnp.asarray(np.random.default_rng(i).standard_normal((64, 64), np.float32)) for i in range(40)}
    ckpt.save(1, state, {})
    ckpt.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
      ckpt.save(2, state, {})
      for _ in range(1000):  # the training loop's check between steps
        ckpt.raise_if_save_failed()
        time.sleep(0.01)
    except checkpoint.CheckpointSaveError as error:
      print("raised:", error, flush=True)
    ckpt.close()  # reported once: closing does not raise it again
    print("closed", flush=True)
""")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_failing_storage_is_one_message_at_that_save(tmp_path, mode):
  directory = str(tmp_path / "checkpoints")
  # Output goes to pipes, which the file size limit does not touch.
  result = subprocess.run([sys.executable, "-c", _FULL_STORAGE, directory, mode], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [
      f"raised: Could not save checkpoint step 2 in {directory}: [Errno 27] File too large. Steps still kept "
      "there: [1].", "closed"]
  for flood in ("Traceback", "Event loop is closed", "ERROR"):
    assert flood not in result.stderr, result.stderr[-3000:]


def test_partial_saves_are_removed_by_the_lead(tmp_path):
  directory = _saved(tmp_path)
  # What a save killed before its final rename leaves: a whole step under orbax's temporary name.
  shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp"))
  checkpoint.Checkpointer(directory, max_to_keep=3).close()
  assert "3.orbax-checkpoint-tmp" in os.listdir(directory)  # only the lead, which holds the workdir, cleans
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3, cleanup_partial=True)
  assert sorted(os.listdir(directory)) == ["1", "2"] and ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_a_run_resumes_from_the_step_before_a_damaged_one(tmp_path, capsys):
  from sslx import train  # pylint: disable=g-import-not-at-top  (the other tests need no training loop)
  from train_helpers import logged_losses, tiny_run_config  # pylint: disable=g-import-not-at-top
  clean, damaged = tmp_path / "clean", tmp_path / "damaged"
  expected, _ = train.train(tiny_run_config(), str(clean))  # checkpoints at steps 2, 4 and 6
  shutil.copytree(clean, damaged)
  _truncate_array(str(damaged / "checkpoints" / "6"))
  capsys.readouterr()
  state, _ = train.train(tiny_run_config(), str(damaged))
  printed = capsys.readouterr().out
  assert "Checkpoint step 6 cannot be read" in printed and f"Resumed from {damaged}/checkpoints/4" in printed
  assert os.path.isdir(damaged / "checkpoints" / "6.corrupt") and os.path.isdir(damaged / "checkpoints" / "6")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(expected.params))
  assert logged_losses(damaged) == logged_losses(clean)
