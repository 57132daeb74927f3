"""submitit against the real local Slurm cluster (scripts/slurm/local_cluster.sh).

Needs the ``slurm_cluster`` fixture from tests/slurm_cluster.py. Every wait polls; no fixed sleeps
in the tests (the jobs themselves sleep a little where ordering has to be visible).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

pytestmark = pytest.mark.slurm

# The job functions below live in a test module that the job's Python cannot import (tests/ is not
# on its sys.path): ship them by value instead of by reference.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


# ------------------------------------------------------------------------------- job functions
def _add(a: int, b: int) -> int:
    return a + b


def _square(x: int) -> int:
    return x * x


def _write_after(path: str, text: str, delay_s: float) -> str:
    time.sleep(delay_s)  # a dependant that started too early would not find the file
    Path(path).write_text(text)
    return text


def _read(path: str) -> str:
    return Path(path).read_text()  # FileNotFoundError if run before its dependency


def _fail() -> None:
    raise RuntimeError("this job fails on purpose")


def _touch(path: str) -> str:
    Path(path).write_text("ran")
    return "ran"


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# ------------------------------------------------------------------------------------- helpers
def _state(job: submitit.Job) -> str:
    """Fresh state from sacct (job.state may be stale right after result())."""
    return job.get_info(mode="force").get("State", "UNKNOWN")


def _wait_state(cluster, job: submitit.Job, accept, timeout: float = 60) -> str:
    return cluster.wait_until(
        lambda: (s := _state(job)).split()[0] in accept and s,
        timeout=timeout,
        what=f"job {job.job_id} to reach one of {accept}",
    )


def _kill_invalid_depend() -> bool:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return any(
        line.split("=", 1)[0].strip() == "DependencyParameters" and "kill_invalid_depend" in line
        for line in out.splitlines()
    )


def _after(cluster, tmp_path: Path, job: submitit.Job, name: str):
    return cluster.executor(
        tmp_path / name, slurm_additional_parameters={"dependency": f"afterok:{job.job_id}"}
    )


# --------------------------------------------------------------------------------------- tests
def test_single_job_returns_value(slurm_cluster, tmp_path):
    executor = slurm_cluster.executor(tmp_path / "logs")
    job = executor.submit(_add, 2, 3)
    assert job.result() == 5
    assert _wait_state(slurm_cluster, job, ("COMPLETED",)) == "COMPLETED"
    assert slurm_cluster.partition == "debug"


def test_map_array_of_three(slurm_cluster, tmp_path):
    executor = slurm_cluster.executor(tmp_path / "logs")
    jobs = executor.map_array(_square, [1, 2, 3])
    assert len(jobs) == 3
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "one Slurm job array"
    assert [job.result() for job in jobs] == [1, 4, 9]


def test_afterok_chain_runs_in_order(slurm_cluster, tmp_path):
    marker = tmp_path / "first.txt"
    first = slurm_cluster.executor(tmp_path / "logs1").submit(_write_after, str(marker), "from-first", 1.0)
    second = _after(slurm_cluster, tmp_path, first, "logs2").submit(_read, str(marker))
    assert second.result() == "from-first"
    assert first.result() == "from-first"
    (row1,) = slurm_cluster.sacct(first.job_id)
    (row2,) = slurm_cluster.sacct(second.job_id)
    assert row2["Start"] >= row1["End"], (row1, row2)  # ISO timestamps compare as strings


def test_failed_job_raises_and_dependant_never_runs(slurm_cluster, tmp_path):
    marker = tmp_path / "dependant-ran.txt"
    failing = slurm_cluster.executor(tmp_path / "logs1").submit(_fail)
    dependant = _after(slurm_cluster, tmp_path, failing, "logs2").submit(_touch, str(marker))
    with pytest.raises(FailedJobError, match="fails on purpose"):
        failing.result()
    assert _wait_state(slurm_cluster, failing, ("FAILED",)) == "FAILED"

    # With DependencyParameters=kill_invalid_depend (our slurm.conf) Slurm cancels the dependant
    # itself; on clusters without it, it stays PENDING (DependencyNeverSatisfied) until cancelled.
    auto_cancel = _kill_invalid_depend()

    def settled():
        state = _state(dependant)
        if state.startswith("CANCELLED"):
            return state
        if not auto_cancel and slurm_cluster.squeue_reason(dependant.job_id) == "DependencyNeverSatisfied":
            subprocess.run(["scancel", dependant.job_id], check=True)
        return None

    slurm_cluster.wait_until(settled, timeout=60, what="the dependant of a failed job to be cancelled")
    assert slurm_cluster.wait_until(lambda: dependant.done(force_check=True), timeout=30, what="done()")
    (row,) = slurm_cluster.sacct(dependant.job_id, "JobID,State,Reason,NodeList,Elapsed")
    assert row["State"].startswith("CANCELLED"), row
    # a job cancelled while pending gets Start=End=cancel time in sacct, but never a node
    assert row["NodeList"] == "None assigned" and row["Elapsed"] == "00:00:00", f"dependant ran: {row}"
    assert not marker.exists()
    with pytest.raises(UncompletedJobError):
        dependant._results_timeout_s = 1  # no result file will come: skip submitit's 15 s wait
        dependant.result()


def test_scancel_is_seen_as_finished(slurm_cluster, tmp_path):
    job = slurm_cluster.executor(tmp_path / "logs").submit(_sleep, 150)
    _wait_state(slurm_cluster, job, ("RUNNING",))
    subprocess.run(["scancel", job.job_id], check=True)
    # submitit learns about a job that died without a result only from sacct (slurmdbd)
    slurm_cluster.wait_until(lambda: job.done(force_check=True), timeout=60, what="done() after scancel")
    assert _state(job).startswith("CANCELLED")
    job._results_timeout_s = 1  # no result file will come: do not wait submitit's default 15 s for it
    with pytest.raises(UncompletedJobError):
        job.result()
