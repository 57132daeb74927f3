"""pytest plugin: a real local Slurm cluster for tests marked ``slurm``.

Load it from ``tests/conftest.py`` with::

    pytest_plugins = ["slurm_cluster"]

(``tests/`` is on ``sys.path`` there with pytest's default import mode), or on the command line
with ``-p slurm_cluster`` when ``tests/`` is on the path.

The session-scoped fixture ``slurm_cluster`` uses ``scripts/slurm/local_cluster.sh``:

- skips when not root, when ``MUCS_SLURM=0``, or when ``sbatch`` is missing and may not be
  installed (``MUCS_SLURM_INSTALL=1`` lets the fixture run ``local_cluster.sh install``);
- starts the cluster if nothing of it runs, and then stops it at the end of the session; a cluster
  that was already (partly) running is completed if needed and left running;
- yields a :class:`SlurmCluster` with ``.partition`` and ``.executor(folder, **params)``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "local_cluster.sh"
PARTITION = "debug"

# submitit asks for a USR2 signal 90 s before the time limit: stay well above it
DEFAULT_PARAMS: dict[str, Any] = {"timeout_min": 3, "cpus_per_task": 1, "slurm_partition": PARTITION}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a running local Slurm cluster (root + Debian packages)")


def _script(cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


def _output(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr).strip()


@dataclass
class SlurmCluster:
    """Handle on the running local cluster."""

    partition: str = PARTITION
    started_here: bool = False

    def executor(self, folder: str | os.PathLike, **slurm_params: Any):
        """A ``submitit.AutoExecutor(folder, cluster="slurm")`` with test-friendly defaults
        (timeout_min=3, cpus_per_task=1, partition ``debug``, no GPUs); ``slurm_params`` override
        them (any ``update_parameters`` keyword, e.g. ``slurm_additional_parameters``)."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = dict(DEFAULT_PARAMS)
        params.update(slurm_params)
        executor.update_parameters(**params)
        return executor

    # --- small helpers for tests -------------------------------------------------------------
    @staticmethod
    def sacct(job_id: str, fields: str = "JobID,State,Reason,Start,End,ExitCode") -> list[dict[str, str]]:
        """Rows of ``sacct -j JOB`` (accounting, so also finished jobs), one dict per row."""
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", fields],
            capture_output=True, text=True, check=True,
        ).stdout
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]

    @staticmethod
    def squeue_reason(job_id: str) -> str | None:
        """The pending reason of a job still in the queue, else None."""
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%r"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return out or None

    @staticmethod
    def wait_until(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.25, what: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("MUCS_SLURM") == "0":
        pytest.skip("Slurm tests disabled by MUCS_SLURM=0")
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (they install and start a local Slurm cluster)")
    if shutil.which("sbatch") is None:
        if os.environ.get("MUCS_SLURM_INSTALL") != "1":
            pytest.skip(
                "sbatch not found: run `bash scripts/slurm/local_cluster.sh install` "
                "or set MUCS_SLURM_INSTALL=1 to let the tests install Slurm"
            )
        proc = _script("install", timeout=900)
        if proc.returncode != 0 or shutil.which("sbatch") is None:
            pytest.skip(f"sbatch missing and could not be installed:\n{_output(proc)}")

    status = _script("status", timeout=60)
    started_here = False
    if status.returncode != 0:
        proc = _script("start", timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"could not start the local Slurm cluster:\n{_output(proc)}", pytrace=False)
        # stop at the end only what this session brought up from nothing
        started_here = status.returncode == 3
    try:
        yield SlurmCluster(partition=PARTITION, started_here=started_here)
    finally:
        if started_here:
            proc = _script("stop", timeout=300)
            if proc.returncode != 0:
                print(f"warning: stopping the local Slurm cluster failed:\n{_output(proc)}")
