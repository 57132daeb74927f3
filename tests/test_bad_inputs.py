"""Bad inputs are refused with one line that says what is wrong and what to do, exit code 2, no traceback,
and every file already in the run folders left byte-identical.

Each case starts from a copy of one finished tiny run (tpre, gpre, a, tpost, gpost with `random`), breaks
something the way a user, a disk or a cluster would, and runs the pipeline or eval on it: in this process
for speed, or as a real command line (`sub`) where the exit code and stderr of the entry point matter.
"""
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from mucs.cli import run_eval, run_pipeline
from mucs.io import file_hash, load_tensor_metadata, save_tensors
from mucs.lock import LOCK, me

ROOT = Path(__file__).resolve().parent.parent
RUN = "digits_dit_edm_s1_k2.0_na3_sb0"
MARKER = Path("/tmp/mucs-test-pickle-ran")  # a pickle's payload would create it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(data_root, tmp_path_factory):
    """One finished run of the five stages, copied afresh for every case."""
    logs = tmp_path_factory.mktemp("base") / "logs"
    assert run_pipeline(["--what=tpre,gpre,a,tpost,gpost", "--attrib=random"] + args_for(data_root, logs)) == 0
    return logs


def args_for(data_root, logs):
    return TINY + [f"paths.data={data_root}", f"paths.logs={logs}", f"paths.plots={logs.parent / 'plots'}",
                   f"paths.cache={logs.parent / 'cache'}"]


# ---------------------------------------------------------------------------------------------
# Ways to break a run folder


def pre(logs):
    return logs / f"{RUN}--pre"


def post(logs):
    return logs / f"{RUN}--post_random"


def flip_byte(path, at=-100):
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def reseal(folder, stage):
    """Make a stage's manifest agree with its (edited) outputs: a run folder whose files are consistent
    with each other but wrong, so the check that fires is the one about the content."""
    m = json.loads((folder / f"{stage}.manifest.json").read_text())
    m["outputs"] = {o: file_hash(folder / o) for o in m["outputs"]}
    (folder / f"{stage}.manifest.json").write_text(json.dumps(m))


def only_a_done(logs):
    """The post folder as it is after `a`, before `tpost`."""
    for f in post(logs).iterdir():
        if f.name.startswith(("model-", "train", "samples", "tpost.", "gpost.")):
            f.unlink()


def edit_attrib(logs, **change):
    only_a_done(logs)
    path = post(logs) / "attrib.safetensors"
    t = load_file(str(path))
    t.update({k: f(t) for k, f in change.items()})
    save_tensors(path, t)
    reseal(post(logs), "a")


def retrain_pre(logs):
    """A consistent but different pre model, as if tpre had been redone with --force."""
    path = pre(logs) / "model-best.safetensors"
    t = load_file(str(path))
    k = next(iter(t))
    t[k] = t[k] + 1e-3
    save_tensors(path, t, load_tensor_metadata(path))
    reseal(pre(logs), "tpre")


def other_seeds(logs, tmp):
    path = post(logs) / "samples.safetensors"
    t = load_file(str(path))
    t["seeds"] = t["seeds"] + 1
    save_tensors(path, t)
    reseal(post(logs), "gpost")


class Payload:
    """A pickle that would run a shell command when loaded by an unsafe loader."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def evil_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload()))


def write_dataset_meta(folder, **meta):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(dict(dict(name="mine", format_version=1, channels=1, resolution=8,
                                                           num_classes=10, cond="class", cond_dim=0), **meta)))


def hold_lock(logs):
    """A lock of this (live) process on the pre folder, as a second pipeline would find it."""
    (pre(logs) / LOCK).write_text(json.dumps(dict(me(), what="stage gpre")))


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    id: str
    args: list
    words: str  # in the error line
    setup: Callable = None  # (logs, tmp) -> None
    tool: str = "pipeline"  # or eval
    sub: bool = False  # run the real command line in a subprocess
    extra: list = field(default_factory=list)  # extra overrides that need the case's folders: (logs, tmp) -> list


EVAL = ["--methods=random", f"--jobs={RUN}", "--no_plots", "--metrics=mse"]
CASES = [
    Case("unknown_stage", ["--what=tpre,foo"], "unknown stage foo"),
    Case("unknown_job", ["--job=nope"], "unknown job 'nope'"),
    Case("unknown_method", ["--attrib=nope"], "unknown attrib 'nope'"),
    Case("unknown_metric", EVAL[:-1] + ["--metrics=ssim,nope"], "unknown metric 'nope'", tool="eval"),
    Case("eval_method_not_run", ["--methods=random,pixel", f"--jobs={RUN}"], "run pipeline.py --attrib=pixel",
         tool="eval"),
    Case("override_without_value", ["train.steps"], "malformed override"),
    Case("override_not_a_number", ["train.steps=abc"], "train.steps=abc: expected a number"),
    Case("override_unknown_key", ["train.stepz=3"], "Could not override 'train.stepz'"),
    Case("override_not_a_bool", ["use_last_ckpt=maybe"], "expected true or false"),
    Case("bad_shard", ["--what=a", "--shard=2/x"], "--shard '2/x' must be i/n"),
    Case("missing_checkpoint", ["--what=a", "--attrib=pixel"], "run --what=tpre first",
         lambda logs, tmp: (pre(logs) / "model-best.safetensors").unlink()),
    Case("truncated_checkpoint", ["--what=a", "--attrib=pixel"], "changed since tpre wrote it",
         lambda logs, tmp: truncate(pre(logs) / "model-best.safetensors")),
    Case("corrupted_post_checkpoint", ["--what=gpost"], "changed since tpost wrote it",
         lambda logs, tmp: flip_byte(post(logs) / "model-best.safetensors")),
    Case("checkpoint_of_unfinished_training", ["--seed=5", "--what=gpre"], "stage tpre has not finished",
         lambda logs, tmp: shutil.copytree(pre(logs), logs / f"{RUN.replace('_s1_', '_s5_')}--pre",
                                           ignore=shutil.ignore_patterns("*.manifest.json", "config.yaml"))),
    Case("truncated_training_state", ["--seed=6", "--what=tpre"], "corrupted, truncated or unsafe training state",
         lambda logs, tmp: (shutil.copytree(pre(logs), logs / f"{RUN.replace('_s1_', '_s6_')}--pre",
                                            ignore=shutil.ignore_patterns("*.manifest.json", "config.yaml")),
                            truncate(logs / f"{RUN.replace('_s1_', '_s6_')}--pre" / "train-state.pt"))),
    Case("pickle_as_training_state", ["--seed=7", "--what=tpre"], "corrupted, truncated or unsafe training state",
         lambda logs, tmp: evil_file(logs / f"{RUN.replace('_s1_', '_s7_')}--pre" / "train-state.pt"), sub=True),
    Case("pickle_as_targets_pt", ["--what=a", "--attrib=pixel"], "must be a folder of PNGs or a .safetensors file",
         lambda logs, tmp: evil_file(tmp / "evil.pt"), extra=lambda logs, tmp: [f"targets={tmp / 'evil.pt'}"]),
    Case("pickle_as_targets_safetensors", ["--what=a", "--attrib=pixel"], "corrupted or truncated targets file",
         lambda logs, tmp: evil_file(tmp / "evil.safetensors"),
         extra=lambda logs, tmp: [f"targets={tmp / 'evil.safetensors'}"]),
    Case("targets_folder_without_pngs", ["--what=a", "--attrib=pixel"], "no PNG files in",
         lambda logs, tmp: (tmp / "empty").mkdir(), extra=lambda logs, tmp: [f"targets={tmp / 'empty'}"]),
    Case("missing_samples", ["--what=a", "--attrib=pixel"], "run --what=gpre first",
         lambda logs, tmp: (pre(logs) / "samples.safetensors").unlink()),
    Case("corrupted_samples", ["--what=a", "--attrib=pixel"], "changed since gpre wrote it",
         lambda logs, tmp: flip_byte(pre(logs) / "samples.safetensors")),
    Case("truncated_samples_in_eval", EVAL, "changed since gpre wrote it",
         lambda logs, tmp: truncate(pre(logs) / "samples.safetensors"), tool="eval"),
    Case("corrupted_ids", ["--what=tpost"], "changed since a wrote it",
         lambda logs, tmp: flip_byte(post(logs) / "attrib.safetensors"), sub=True),
    Case("ids_file_of_something_else", ["--what=tpost"], "is not an attribution file",
         lambda logs, tmp: (only_a_done(logs), save_tensors(post(logs) / "attrib.safetensors", dict(x=torch.zeros(2))),
                            reseal(post(logs), "a"))),
    Case("ids_not_in_training_set", ["--what=tpost"], "ids to remove are not in the training set",
         lambda logs, tmp: edit_attrib(logs, top_ids=lambda t: t["top_ids"] + 100000)),
    Case("ids_of_another_split", ["--what=tpost"], "ranks another training split",
         lambda logs, tmp: edit_attrib(logs, train_ids=lambda t: t["train_ids"][:-1])),
    Case("empty_dataset_after_removal", ["--what=tpost"], "leaves an empty training set",
         lambda logs, tmp: edit_attrib(logs, top_ids=lambda t: t["train_ids"].reshape(3, -1).clone())),
    Case("removal_larger_than_training_set", ["--what=a", "--attrib=pixel", "num_removal=1500"],
         "num_removal 1500 is not smaller than the training set"),
    Case("pre_post_samples_with_other_seeds", EVAL, "have different seeds", other_seeds, tool="eval", sub=True),
    Case("tpost_with_ids_from_another_pre_model", ["--what=tpost"], "model-best.safetensors, which changed since",
         lambda logs, tmp: retrain_pre(logs)),
    Case("gpost_after_tpre_redone", ["--what=gpost"], "which changed since", lambda logs, tmp: retrain_pre(logs)),
    Case("other_sampler_settings", ["--what=gpost", "sample.num_steps=7"], "sample.num_steps: 4 -> 7"),
    Case("other_training_settings", ["--what=gpre", "train.lr=0.5"], "train.lr: 0.001 -> 0.5"),
    Case("nan_loss_in_training", ["--seed=9", "--what=tpre", "train.lr=1e30"], "training loss became", sub=True),
    Case("nan_loss_in_unlearning", ["--what=a", "attrib=mucs", "attrib.num_noises=8", "attrib.null_batches=2",
                                    "attrib.lr_factor=1e-35", "attrib.tolerance=-1", "attrib.max_steps=20"],
         "non-finite"),
    Case("dataset_folder_missing", ["--seed=9", "--what=tpre", "data.name=mine"], "is missing or incomplete",
         extra=lambda logs, tmp: [f"data.folder={tmp / 'nowhere'}"]),
    Case("dataset_of_another_format", ["--seed=9", "--what=tpre", "data.name=mine"], "format version 0",
         lambda logs, tmp: write_dataset_meta(tmp / "mine", format_version=0),
         extra=lambda logs, tmp: [f"data.folder={tmp / 'mine'}"]),
    Case("dataset_split_corrupted", ["--seed=9", "--what=tpre", "data.name=mine"], "corrupted or truncated dataset",
         lambda logs, tmp: (write_dataset_meta(tmp / "mine"), (tmp / "mine" / "train.safetensors").write_bytes(b"x" * 64)),
         extra=lambda logs, tmp: [f"data.folder={tmp / 'mine'}"]),
    Case("folder_locked_by_a_live_pipeline", ["--what=gpre"], f"is in use by pid {os.getpid()}",
         lambda logs, tmp: hold_lock(logs)),
]


def snapshot(*roots):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in roots if r.exists()
            for p in sorted(r.rglob("*")) if p.is_file()}


def run(case, args, capsys):
    if case.sub:
        script = "pipeline.py" if case.tool == "pipeline" else "eval.py"
        r = subprocess.run([sys.executable, str(ROOT / script)] + args, cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return r.returncode, r.stderr
    capsys.readouterr()
    code = (run_pipeline if case.tool == "pipeline" else run_eval)(args)
    return code, capsys.readouterr().err


def assert_refused(case, code, err):
    assert code == 2, f"{case.id}: exit code {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]  # progress bars may come before it
    assert case.words in errors[0], errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case, base, data_root, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(base, logs)
    MARKER.unlink(missing_ok=True)
    if case.setup:
        case.setup(logs, tmp_path)
    before = snapshot(logs, tmp_path / "mine")
    if case.tool == "pipeline":
        args = args_for(data_root, logs) + case.args  # last, so the tiny settings do not override them
    else:
        args = case.args + [f"--logs={logs}"] + [a for a in args_for(data_root, logs) if a.startswith("paths.")]
    code, err = run(case, args + (case.extra(logs, tmp_path) if case.extra else []), capsys)
    assert_refused(case, code, err)
    after = snapshot(logs, tmp_path / "mine")
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"{case.id} changed or removed {changed}"
    assert not list(logs.rglob(LOCK)) or case.id == "folder_locked_by_a_live_pipeline"
    assert not MARKER.exists(), "a pickle's code ran"


def test_enough_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------
# A full disk


def test_disk_full_while_writing(base, data_root, tmp_path, capsys, monkeypatch):
    """Every rename of a finished file fails with ENOSPC: one line, nothing in the run folders changed."""
    logs = tmp_path / "logs"
    shutil.copytree(base, logs)
    before = snapshot(logs)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mucs.io.os.replace", full)
    case = Case("disk_full", ["--what=a", "--attrib=pixel"], "disk full while writing")
    assert_refused(case, *run(case, case.args + args_for(data_root, logs), capsys))
    assert all(snapshot(logs).get(p) == h for p, h in before.items())
    assert not [p for p in logs.rglob("*.tmp")], "a partial file was left behind"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_disk(base, data_root, small_disk):
    """On a real full filesystem (safetensors and torch.save raise their own errors there), the pipeline
    still says `disk full` in one line and the existing files are intact."""
    logs = small_disk / "logs"
    shutil.copytree(base / f"{RUN}--pre", logs / f"{RUN}--pre", ignore=shutil.ignore_patterns("train-state.pt"))
    st = os.statvfs(small_disk)  # fill it, leaving room for the lock and the small files written first
    (small_disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 12 * 1024))
    before = snapshot(logs)
    case = Case("really_full", ["--what=a", "--attrib=pixel"], "disk full while writing", sub=True)
    code, err = run(case, case.args + args_for(data_root, logs), None)
    assert_refused(case, code, err)
    assert all(snapshot(logs).get(p) == h for p, h in before.items())


# ---------------------------------------------------------------------------------------------
# Like with like


def test_eval_compares_like_with_like(base, data_root, tmp_path, capsys):
    """A method that removes another number of ids per target than random, or whose union is over other targets,
    is refused in one line naming both; --allow_unequal evaluates it and the table marks it."""
    logs = tmp_path / "logs"
    shutil.copytree(base, logs)
    targets = tmp_path / "targets.safetensors"
    save_tensors(targets, dict(images=torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1))
    over = args_for(data_root, logs)
    assert run_pipeline(["--what=a,tpost,gpost", "--attrib=pixel", "num_removal=7"] + over) == 0
    assert run_pipeline(["--what=a,tpost,gpost", "--attrib=random2", f"targets={targets}"] + over) == 0
    ev = [f"--jobs={RUN}", f"--logs={logs}", "--no_plots", "--metrics=mse"] + [a for a in over if "paths." in a]
    for methods, words in (("random,pixel", "pixel removes 7 ids per target in digits_dit_edm_s1_k2.0_na3_sb0, "
                                            "random 10"),
                           ("random,random2", f"random2's union in {RUN} is over 3 targets {targets}, random's over "
                                              f"3 gpre targets")):
        case = Case("unequal", [], words, tool="eval")
        assert_refused(case, *run(case, ev + [f"--methods={methods}"], capsys))
    capsys.readouterr()
    assert run_eval(ev + ["--methods=random,pixel,random2", "--allow_unequal", "--fn_out=unequal"]) == 0
    out = capsys.readouterr().out
    assert "pixel *" in out and "random2 *" in out and "* not like with like (--allow_unequal): pixel removes 7" in out
    import pandas as pd
    summary = pd.read_csv(tmp_path / "plots" / "unequal" / "summary.csv").fillna("")
    assert set(summary[summary.unequal != ""].method) == {"pixel", "random2"}
