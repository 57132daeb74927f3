"""Killed stages resume to the same bytes, and one run folder has one writer at a time.

- Every stage (training, generation, MUCS attribution, retraining, regeneration, LDS) is SIGKILLed at seeded
  random points of its progress, rerun, and its outputs compared with an uninterrupted run's.
- The folder lock: a live holder is named and waited for, a dead one (same host) is taken over, another
  host's is left alone unless it is our own requeued Slurm job, and two pipelines on one folder do not mix.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from mucs.cli import run_pipeline
from mucs.errors import UserError
from mucs.io import load_tensor_metadata
from mucs.lock import LOCK, FolderLock

ROOT = Path(__file__).resolve().parent.parent
RUN = "digits_dit_edm_s1_k2.0_na4_sb300"
MODELS = "digits_dit_edm_s1_sb300--lds-models"  # the LDS subset models, shared by the job's runs
# slow enough to be killed mid-way, seconds in all: 32 training steps saved every 4 on 300 items, 12 candidates
# sampled one per batch, 4 MUCS targets, 2 LDS models of 16 steps
SLOW = [o for o in TINY if not o.startswith(("train.steps", "num_attrib"))] + [
    "train.steps=32", "subsample=300", "num_attrib=4", "sample.batch=1", "sample.num_steps=24", "attrib=mucs",
    "attrib.num_noises=16", "attrib.null_batches=10", "attrib.eval_batch=2048", "attrib.max_steps=40",
    "lds.num_subsets=2", "lds.num_seeds=1", "lds.steps=16", "lds.num_noises=8", "lds.bootstrap=50"]
STAGES = ["tpre", "gpre", "a", "tpost", "gpost", "lds"]
OUTPUTS = {"tpre": ["model-best.safetensors", "model-last.safetensors", "train_log.csv"],
           "gpre": ["samples.safetensors", "samples.png"],
           "a": ["attrib.safetensors", "attrib_log.jsonl"],
           "tpost": ["model-best.safetensors", "model-last.safetensors", "train_log.csv"],
           "gpost": ["samples.safetensors", "samples.png"],
           "lds": ["lds-outputs.safetensors", f"../{MODELS}/m0_s0/model-best.safetensors",
                   f"../{MODELS}/m1_s0/model-last.safetensors"]}
KILLS = {"tpre": 2, "gpre": 2, "a": 2, "tpost": 2, "gpost": 1, "lds": 2}  # at least 10 must land before the end


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread here and in the subprocesses: the same float sums in both, and tiny models run several times
    faster than with two threads on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def folder_of(logs, stage):
    return logs / (f"{RUN}--pre" if stage in ("tpre", "gpre") else f"{RUN}--lds" if stage == "lds" else
                   f"{RUN}--post_mucs")


def overrides(data_root, logs):
    return SLOW + [f"paths.data={data_root}", f"paths.logs={logs}", f"paths.cache={logs / 'cache'}"]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted run of the five stages."""
    logs = tmp_path_factory.mktemp("ref") / "logs"
    assert run_pipeline(["--what=" + ",".join(STAGES)] + overrides(data_root, logs)) == 0
    return logs


def progress(stage, folder):
    """A number that grows as the stage gets on: training states written, batches or targets finished."""
    if stage in ("tpre", "tpost"):
        p = folder / "train-state.pt"
        return p.stat().st_mtime_ns if p.exists() else 0
    if stage == "lds":  # its models' training states and measured outputs
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in (folder.parent / MODELS).glob("m*/*")
                            if p.suffix in (".pt", ".safetensors")))
    parts = folder / ("attrib-parts" if stage == "a" else f"{stage}-parts")
    return len(list(parts.glob("*.safetensors"))) if parts.exists() else 0


def holds_lock(folder, pid):
    try:
        return json.loads((folder / LOCK).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def kill_at_random_point(stage, args, folder, rng):
    """Start the stage, wait until it holds the folder's lock and has made 0-1 (seeded) more units of progress,
    then a random fraction of a second more, and SIGKILL it. Returns whether the stage was still unfinished."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), f"--what={stage}"] + args, cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps, seen, start, started = rng.randint(0, 1), set(), progress(stage, folder), False
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < 120:
            p = progress(stage, folder)
            if p != start:
                seen.add(p)
            started = started or holds_lock(folder, proc.pid)
            if started and len(seen) >= steps:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return proc.returncode == -signal.SIGKILL and not (folder / f"{stage}.manifest.json").exists()


def assert_same_outputs(stage, a, b):
    for name in OUTPUTS[stage]:
        pa, pb = a / name, b / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(pa)), load_file(str(pb))
            assert ta.keys() == tb.keys() and load_tensor_metadata(pa) == load_tensor_metadata(pb), f"{stage}: {name}"
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{stage}: {name} differs from the uninterrupted run"
            assert pa.read_bytes() == pb.read_bytes(), f"{stage}: {name}"
        elif name.endswith(".jsonl"):  # per-target logs: all but the timings (seconds, unlearn_s, eval_s)
            rows = [[{k: v for k, v in json.loads(r).items() if k != "seconds" and not k.endswith("_s")}
                     for r in p.read_text().splitlines()]
                    for p in (pa, pb)]
            assert rows[0] == rows[1], f"{stage}: {name}"
        else:
            assert pa.read_bytes() == pb.read_bytes(), f"{stage}: {name}"
    ma, mb = (json.loads((d / f"{stage}.manifest.json").read_text()) for d in (a, b))
    assert ma["outputs"] == mb["outputs"] and sorted(ma["inputs"].values()) == sorted(mb["inputs"].values())


def test_killed_stages_resume_identically(reference, data_root, tmp_path, capsys):
    """At least 10 SIGKILLs at seeded random points over the five stages; each stage then finishes with the
    outputs of the uninterrupted run, taking over the dead run's lock."""
    logs = tmp_path / "logs"
    args = overrides(data_root, logs)
    rng, killed = random.Random(20240609), 0
    for stage in STAGES:
        folder = folder_of(logs, stage)
        for _ in range(KILLS[stage]):
            killed += kill_at_random_point(stage, args, folder, rng)
        left_lock = (folder / LOCK).exists()
        capsys.readouterr()
        assert run_pipeline([f"--what={stage}"] + args) == 0
        assert ("taking over the stale lock" in capsys.readouterr().out) == left_lock
        assert not (folder / LOCK).exists()
        assert_same_outputs(stage, folder_of(reference, stage), folder)
        assert not (folder / f"{stage}-parts").exists() and not (folder / f"{stage}.progress.json").exists()
    assert killed >= 10, f"only {killed} of the kill points came before the stage finished"


# ---------------------------------------------------------------------------------------------
# The lock


HOLD = """import sys
from mucs.lock import FolderLock
lock = FolderLock(sys.argv[1], what="test holder").acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
lock.release()
"""


def holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_live_lock_is_named_and_waited_for(tmp_path):
    p = holder(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by pid {p.pid} on host {socket.gethostname()}"):
            FolderLock(tmp_path).acquire()
        t0 = time.time()
        with pytest.raises(UserError, match="after waiting 0.5 s"):
            FolderLock(tmp_path, wait=0.5).acquire()
        assert time.time() - t0 >= 0.5
        threading.Timer(0.5, p.stdin.close).start()  # the holder releases in half a second
        t0 = time.time()
        with FolderLock(tmp_path, wait=60) as lock:
            assert time.time() - t0 >= 0.4
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid() == lock.mine["pid"]
        assert not (tmp_path / LOCK).exists()
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    p = holder(tmp_path)
    p.kill()  # and not reaped: a zombie holds no lock either
    with FolderLock(tmp_path, wait=10) as lock:
        assert f"taking over the stale lock of {tmp_path} (pid {p.pid}" in capsys.readouterr().out
        assert lock.read()[0]["pid"] == os.getpid()
    p.wait()
    # a lock whose pid now belongs to a younger process is stale too
    (tmp_path / LOCK).write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), start="1", since="x")))
    with FolderLock(tmp_path):
        assert "now belongs to another process" in capsys.readouterr().out


def test_lock_of_another_host_is_kept_unless_it_is_our_requeued_job(tmp_path, monkeypatch, capsys):
    other = dict(pid=1, host="elsewhere.cluster", start="5", since="yesterday", slurm="777", what="stage tpre")
    (tmp_path / LOCK).write_text(json.dumps(other))
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(UserError, match=r"pid 1 on host elsewhere.cluster \(stage tpre, since yesterday\).*delete"):
        FolderLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with FolderLock(tmp_path):
        assert "Slurm job 777 was requeued" in capsys.readouterr().out


RACE = """import sys
from mucs.errors import UserError
from mucs.lock import FolderLock
try:
    lock = FolderLock(sys.argv[1]).acquire()
    print("won", flush=True)
    sys.stdin.read()
    lock.release()
except UserError:
    print("lost", flush=True)
"""


def test_one_of_several_takes_over_a_stale_lock(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(json.dumps(dict(pid=int(dead.stdout), host=socket.gethostname(), since="x")))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    def outcome(p):  # (took over, won or lost); the winner holds until we close its stdin
        lines = [p.stdout.readline().strip()]
        while lines[-1] not in ("won", "lost", ""):
            lines.append(p.stdout.readline().strip())
        return any("taking over the stale lock" in line for line in lines), lines[-1]

    try:
        results = sorted(outcome(p) for p in procs)
        assert results == [(False, "lost")] * 3 + [(True, "won")]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert not (tmp_path / LOCK).exists()


def test_two_pipelines_on_one_folder(reference, data_root, tmp_path):
    """While one pipeline trains (held still with SIGSTOP, so timing does not matter), a second on the same
    folder stops at once naming it and a third waits; once the first finishes, the third finds the work done,
    and the result is the uninterrupted run's."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--what=tpre"] + overrides(data_root, logs)
    folder = folder_of(logs, "tpre")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiter = None
    try:
        t0 = time.time()
        while not (folder / "train-state.pt").exists() and first.poll() is None and time.time() - t0 < 120:
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None, "the first pipeline finished before it could be held"
        second = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert f"is in use by pid {first.pid} on host {socket.gethostname()} (stage tpre" in second.stderr
        waiter = subprocess.Popen(cmd + ["lock_wait=300"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        lines = [waiter.stdout.readline()]
        while lines[-1] and "waiting up to 300 s" not in lines[-1]:
            lines.append(waiter.stdout.readline())
        assert f"in use by pid {first.pid}" in lines[-1], lines
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
        out = waiter.communicate(timeout=300)[0]
        assert waiter.returncode == 0 and "[tpre] done already" in out, out
    finally:
        for p in (first, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert not (folder / LOCK).exists()
    assert_same_outputs("tpre", folder_of(reference, "tpre"), folder)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    # mkstemp makes 0600 files; a shared run folder's outputs must be readable by the group like any file
    from mucs.io import save_tensors, torch_save, write_text
    want = 0o666 & ~_umask()
    save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    torch_save(tmp_path / "b.pt", {"x": 1})
    write_text(tmp_path / "c.txt", "c")
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(["a.safetensors", "b.pt", "c.txt"], want)


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
