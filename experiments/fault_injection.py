r"""Fault injection: kill -9 a training run at random moments, resume it each time, compare with a clean run.

    python experiments/fault_injection.py --kills=10 --json_out=fault_injection.jsonl

Runs ``configs/mae_fashion_mnist.py:test`` lengthened to ``--total_steps`` with a checkpoint every
``--every_steps`` (asynchronous saves, the default) twice, through the command line as a user would:
once uninterrupted, and once killed with SIGKILL ``--kills`` times and restarted with the same command
after each kill. Half the kills aim at a moment when an asynchronous save is being written (an
``*.orbax-checkpoint-tmp*`` directory exists); the others at a random step. At the end the final
checkpoints of both runs must hold bit-identical arrays (parameters, optimizer state, everything) and the
same data-iterator state, and the killed run's metrics.jsonl must hold each step once with the clean
run's losses. Prints one JSON line (and appends it to ``--json_out``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir: str, args) -> list[str]:
  return [sys.executable, "-m", "sslx.main", "--config=configs/mae_fashion_mnist.py:test", f"--workdir={workdir}",
          f"--config.total_steps={args.total_steps}", f"--config.checkpoint.every_steps={args.every_steps}",
          "--config.checkpoint.max_to_keep=2", "--config.log_every_steps=1", "--config.monitor.every_steps=0",
          f"--config.viz_every_steps={args.total_steps}"]


def _env() -> dict:
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def _logged_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        steps.append(json.loads(line)["step"])
      except (ValueError, KeyError):
        pass  # a line the kill cut short
  return steps


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def _saving(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def _kill_once(workdir: str, args, target_step: int, during_save: bool) -> dict:
  """Starts the run, kills it when it passes ``target_step`` (and, if asked, while a save is in flight)."""
  process = subprocess.Popen(_command(workdir, args), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while process.poll() is None and time.time() < deadline:
    steps = _logged_steps(workdir)
    if steps and steps[-1] >= target_step and (not during_save or _saving(workdir)):
      break
    time.sleep(0.002)
  saving = _saving(workdir)
  if process.poll() is None:
    process.send_signal(signal.SIGKILL)
  process.wait()
  steps = _logged_steps(workdir)
  return {"target_step": target_step, "aimed_at_save": during_save, "save_in_flight": saving,
          "last_logged_step": steps[-1] if steps else 0, "finished_before_kill": process.returncode == 0}


def _final_checkpoint(workdir: str, step: int):
  path = os.path.join(workdir, "checkpoints", str(step))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  with open(os.path.join(path, "data", "metadata"), encoding="utf-8") as f:
    return state, json.load(f)


def _identical(a, b) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b,
                                                                                             strict=True))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--total_steps", type=int, default=60)
  parser.add_argument("--every_steps", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="sslx_fault_injection_")
  clean, killed = os.path.join(root, "clean"), os.path.join(root, "killed")

  start = time.time()
  subprocess.run(_command(clean, args), cwd=REPO, env=_env(), check=True, capture_output=True)
  clean_seconds = time.time() - start

  targets = sorted(rng.sample(range(2, args.total_steps - 2), args.kills))
  kills = [_kill_once(killed, args, target, during_save=index % 2 == 1) for index, target in enumerate(targets)]
  final = subprocess.run(_command(killed, args), cwd=REPO, env=_env(), capture_output=True, text=True)

  state_clean, data_clean = _final_checkpoint(clean, args.total_steps)
  state_killed, data_killed = _final_checkpoint(killed, args.total_steps)
  steps = _logged_steps(killed)
  record = {
      "experiment": "fault_injection", "date": time.strftime("%Y-%m-%d"), "total_steps": args.total_steps,
      "checkpoint_every_steps": args.every_steps, "kills": kills, "final_returncode": final.returncode,
      "kills_during_a_save": sum(kill["save_in_flight"] for kill in kills),
      "state_bit_identical": _identical(state_clean, state_killed),
      "data_state_identical": data_clean == data_killed,
      "each_step_logged_once": len(steps) == len(set(steps)) and set(steps) == set(range(1, args.total_steps + 1)),
      "losses_identical": _losses(clean) == _losses(killed),
      "clean_run_seconds": round(clean_seconds, 1), "seconds": round(time.time() - start, 1), "workdirs": root,
  }
  line = json.dumps(record)
  print(line)
  if args.json_out:
    with open(args.json_out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
