"""Starts real `jax.distributed` CPU processes on this machine, as a pod slice starts one per host.

Each process learns its place in the cluster from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, the variables `sslx.parallel.maybe_initialize_distributed` reads, so the processes
join the way ``python -m sslx.main`` does on a hand-made cluster. A test holds the processes while they
run (to signal one of them, say) and collects every exit code and log at the end::

  with start_processes(lambda process_id: [sys.executable, SCRIPT, ...], logs_dir=tmp_path) as cluster:
    cluster.processes[1].send_signal(signal.SIGTERM)
    finished = wait_for(cluster)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import time
from typing import Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2


def free_port() -> int:
  """A TCP port that nothing on this machine listens on now, for the coordinator."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def cpu_env(num_devices: int | None = None) -> dict[str, str]:
  """This process's environment for a CPU-only JAX child that imports sslx and the test helpers.

  The XLA flags (conftest's) pass on, so children and in-process runs compile alike; ``num_devices``
  fakes that many CPU devices in the child.
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), JAX_PLATFORMS="cpu")
  if num_devices is not None:
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
  return env


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The running processes, in process-id order, and the files their output goes to."""
  processes: list[subprocess.Popen]
  log_paths: list[str]

  def log(self, process_id: int) -> str:
    """What the process has printed so far (stdout and stderr together)."""
    with open(self.log_paths[process_id], encoding="utf-8") as f:
      return f.read()


@dataclasses.dataclass(frozen=True)
class Finished:
  """How one process ended: its exit status and everything it printed."""
  returncode: int
  log: str


@contextlib.contextmanager
def start_processes(command: Callable[[int], list[str]], *, logs_dir, num_processes: int = NUM_PROCESSES,
                    env: dict[str, str] | None = None) -> Iterator[Cluster]:
  """Runs ``command(process_id)`` for every process id as one ``jax.distributed`` cluster on localhost.

  Output goes to ``logs_dir/process_<id>.log``: to files, not pipes, since a process blocked on a full
  pipe would stall the collectives of all the others. Processes still running on exit are killed.
  """
  env = cpu_env() if env is None else env
  address = f"localhost:{free_port()}"
  cluster = Cluster([], [os.path.join(logs_dir, f"process_{i}.log") for i in range(num_processes)])
  try:
    for process_id, log_path in enumerate(cluster.log_paths):
      with open(log_path, "w", encoding="utf-8") as log:
        cluster.processes.append(subprocess.Popen(
            command(process_id), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(env, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
                     JAX_PROCESS_ID=str(process_id))))
    yield cluster
  finally:
    _kill_running(cluster.processes)


def _kill_running(processes: list[subprocess.Popen]) -> None:
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def wait_for(cluster: Cluster, timeout: float = 300, grace: float = 10) -> list[Finished]:
  """Waits until every process has exited; their exit codes and logs, in process-id order.

  Once one process has failed the others get ``grace`` seconds, then are killed: they would otherwise
  wait in a collective for the missing peer until JAX's own timeouts, minutes later. So are all
  processes still running after ``timeout`` seconds.
  """
  deadline, failed_at = time.monotonic() + timeout, None
  while any(process.poll() is None for process in cluster.processes):
    now = time.monotonic()
    if failed_at is None and any(process.poll() not in (None, 0) for process in cluster.processes):
      failed_at = now
    if now > deadline or (failed_at is not None and now > failed_at + grace):
      _kill_running(cluster.processes)
    time.sleep(0.05)
  return [Finished(process.returncode, cluster.log(i)) for i, process in enumerate(cluster.processes)]


def logs_of_successful(finished: list[Finished]) -> list[str]:
  """The logs, after failing the test with the log of the first process that did not exit with 0."""
  for process_id, result in enumerate(finished):
    assert result.returncode == 0, f"process {process_id} exited with {result.returncode}:\n{result.log[-3000:]}"
  return [result.log for result in finished]


def run_processes(command: Callable[[int], list[str]], *, logs_dir, **kwargs) -> list[str]:
  """`start_processes`, then waits for them all to succeed; their logs."""
  with start_processes(command, logs_dir=logs_dir, **kwargs) as cluster:
    return logs_of_successful(wait_for(cluster))
