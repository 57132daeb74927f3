"""Slurm launcher (mucs/launch.py): grid planning, resources and dependency wiring without a cluster; then the
digits pipeline on the real local Slurm cluster (tests/slurm_cluster.py) against a local run, bit for bit.

The cluster tests run their jobs with one torch thread (launcher.setup) and the local references likewise:
two spinning OpenMP threads per process on a shared 2-core machine are many times slower, not faster."""
import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY
from mucs import cli
from mucs import config as C
from mucs import launch as L
from mucs import slurm_status as SS
from mucs.attrib.base import blocks
from mucs.cli import run_pipeline
from mucs.errors import UserError
from mucs.stages import ORDER

RUN = "digits_dit_edm_s1_k2.0_na3_sb0"


# ---------------------------------------------------------------------------------------------
# Without a cluster


def test_grid_shares_pre_stages_between_methods():
    units = L.plan_grid(["j1", "j2"], ["random", "mucs", "pixel"], [1, 2], ORDER)
    pre = [u for u in units if not u.after_pre]
    assert [(u.job, u.seed, u.stages) for u in pre] == [(j, s, ("tpre", "gpre")) for j in ("j1", "j2") for s in (1, 2)]
    post = [u for u in units if u.after_pre]
    assert sorted((u.job, u.seed, u.method) for u in post) == sorted(
        (j, s, m) for j in ("j1", "j2") for s in (1, 2) for m in ("random", "mucs", "pixel"))
    assert all(u.stages == ("a", "tpost", "gpost") for u in post)
    for u in post:  # every post unit comes after the pre unit it waits for
        first = next(i for i, p in enumerate(units) if p in pre and (p.job, p.seed) == (u.job, u.seed))
        assert first < units.index(u)
    only_post = L.plan_grid(["j1"], ["mucs"], [3], ["a", "gpost"])
    assert only_post == [L.Unit("j1", 3, "mucs", ("a", "gpost"), False)]
    assert cli.parse_list("1-3,5", "seeds") == [1, 2, 3, 5]
    with pytest.raises(UserError, match="unknown nope"):
        cli.parse_list("random,nope", "methods", C.options("attrib"))


def test_grid_dry_run_prints_the_grid_and_submits_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(L, "make_executor", lambda *a: pytest.fail("a dry run submitted"))
    assert cli.grid_main(["--jobs=digits_dit_edm", "--methods=random,pixel", "--seeds=1,2", "--dry_run",
                          "--num_attrib=5", f"paths.logs={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "2 + 4 submissions" in out
    assert out.count("tpre,gpre") == 2 and out.count("a,tpost,gpost  after pre") == 4
    assert "digits_dit_edm_s2_k2.0_na5_sb0  post_pixel" in out


def test_resources_per_stage_from_config_and_overrides():
    cfg = C.compose(["launcher=slurm", "launcher.partition=gpu", "launcher.stages.a.timeout_min=600",
                     "launcher.additional={exclude: n1}", "launcher.stages.tpre.additional={nice: 5}",
                     "launcher.setup=[module load cuda]"])
    a, tpre, merge = (L.resources(cfg.launcher, s) for s in ("a", "tpre", "merge"))
    assert a["timeout_min"] == 600 and tpre["timeout_min"] == 1440 and merge["timeout_min"] == 60
    assert a["slurm_partition"] == tpre["slurm_partition"] == "gpu" and a["gpus_per_node"] == 1
    assert "gpus_per_node" not in merge  # 0 GPUs: no --gpus-per-node at all
    assert tpre["slurm_additional_parameters"] == {"exclude": "n1", "nice": 5, "kill_on_invalid_dep": "yes"}
    assert a["slurm_additional_parameters"] == {"exclude": "n1", "kill_on_invalid_dep": "yes"}
    assert tpre["slurm_setup"] == ["module load cuda"]
    assert "slurm_account" not in a  # null: not passed, the cluster's default
    # the jobs re-compose the config without the launcher and independently of the submitting shell
    ov = L.job_overrides(cfg, ["launcher=slurm", "launcher.partition=gpu", "seed=3"])
    assert ov[-1] == "launcher=local" and "seed=3" in ov and not any("gpu" in o for o in ov)
    assert C.compose(ov).paths.pointer_to == cfg.paths.pointer_to


class FakeExecutor:
    """Stands in for submitit: records what would be submitted, with increasing job ids."""
    submitted, next_id = [], [100]

    def __init__(self, folder, lc):
        self.folder, self.params = folder, {}

    def update_parameters(self, **kw):
        self.params.update(kw)

    def _job(self, call, suffix=""):
        job = type("Job", (), {"job_id": f"{self.next_id[0]}{suffix}"})()
        self.submitted.append(dict(call=call, id=job.job_id, **self.params))
        return job

    def submit(self, call):
        job = self._job(call)
        self.next_id[0] += 1
        return job

    def submit_array(self, calls):
        jobs = [self._job(c, f"_{i}") for i, c in enumerate(calls)]
        self.next_id[0] += 1
        return jobs


@pytest.fixture
def fake_slurm(monkeypatch):
    FakeExecutor.submitted.clear()
    states = {}
    monkeypatch.setattr(L, "make_executor", FakeExecutor)
    monkeypatch.setattr(SS, "slurm_states", lambda ids: {j: s for j, s in states.items()
                                                          if j.split("_")[0] in {i.split("_")[0] for i in ids}})
    return FakeExecutor.submitted, states


def test_dependency_wiring_records_and_status(tiny, fake_slurm, capsys):
    submitted, states = fake_slurm
    assert run_pipeline(["--launcher=slurm", "--attrib=mucs", "launcher.a_shards=5",
                         "launcher.stages.tpost.timeout_min=7"] + tiny) == 0
    out = capsys.readouterr().out
    by = {(s["call"].stage, "prepare" if s["call"].prepare else s["call"].shard): s for s in submitted}
    assert len(submitted) == 1 + 1 + 1 + 3 + 1 + 1 + 1  # a: the shared work, 3 shards, the merge
    dep = lambda key: by[key].get("slurm_dependency")
    t, g = by["tpre", (0, 1)]["id"], by["gpre", (0, 1)]["id"]
    assert dep(("tpre", (0, 1))) is None and dep(("gpre", (0, 1))) == f"afterok:{t}"
    assert by["a", "prepare"]["id"] == "102" and dep(("a", "prepare")) == f"afterok:{t}:{g}"  # MUCS's L_orig, once
    shards = [by["a", (i, 3)] for i in range(3)]
    assert [s["id"] for s in shards] == ["103_0", "103_1", "103_2"]
    assert all(s["slurm_dependency"] == "afterok:102" for s in shards)
    assert dep(("a", (-1, 3))) == "afterok:103" and "gpus_per_node" not in by["a", (-1, 3)]  # merge after the array
    merge = by["a", (-1, 3)]["id"]
    assert dep(("tpost", (0, 1))) == f"afterok:{merge}" and by["tpost", (0, 1)]["timeout_min"] == 7
    assert dep(("gpost", (0, 1))) == f"afterok:{by['tpost', (0, 1)]['id']}:{g}"
    assert f"tpre  job {t}" in out and "prepare 102 + jobs 103_[0-2] (3 shards) + merge" in out
    assert f"{RUN}--slurm" in out
    assert "a_shards=5 capped to 3: mucs scores its 3 targets in batches of 1" in out
    call = by["tpre", (0, 1)]["call"]
    assert call.overrides[-1] == "launcher=local" and not any("a_shards" in o for o in call.overrides)
    assert call.will_run == tuple(ORDER)
    again = call.checkpoint().function  # what a requeue runs: a fresh instance of the same stage
    assert again is not call and (again.overrides, again.stage, again.shard) == (call.overrides, "tpre", (0, 1))
    assert not again.resume  # interrupted before it looked at its folder: a --force must still clear it
    call.manifest = Path("/nonexistent/tpre.manifest.json")  # --force removed it: resume, do not clear again
    assert call.checkpoint().function.resume

    logs = Path(next(o for o in tiny if o.startswith("paths.logs=")).split("=", 1)[1])
    # status: live jobs pending/running, a failed one names its log, a never-started dependant is cancelled
    states.update({t: "COMPLETED", g: "RUNNING", "102": "PENDING", "103_0": "PENDING", "103_[1-2]": "PENDING",
                   merge: "PENDING"})
    rows = {(r["kind"], r["stage"]): r for r in SS.status(logs, "sb0")}
    assert [rows["pre", s]["status"] for s in ("tpre", "gpre")] == ["failed", "running"]  # completed, no manifest
    assert rows["post_mucs", "a"]["status"] == "pending"
    log = Path(logs / f"{RUN}--slurm" / f"{g}_0_log.err")
    log.write_text("Traceback ...\nUserError: boom\n")
    states.update({g: "FAILED", "102": "CANCELLED", "103_0": "CANCELLED", "103_[1-2]": "CANCELLED", merge: "CANCELLED"})
    rows = {(r["kind"], r["stage"]): r for r in SS.status(logs)}
    assert rows["pre", "gpre"]["status"] == "failed" and rows["pre", "gpre"]["log"] == log
    assert rows["post_mucs", "a"]["status"] == "cancelled" and rows["post_mucs", "a"]["log"] is None
    assert SS.status(logs, "no-such-run") == []

    # a second submission waits for live jobs of earlier ones instead of submitting their stages again
    submitted.clear()
    states.update({g: "RUNNING", "102": "PENDING", "103_0": "PENDING", "103_[1-2]": "PENDING", merge: "PENDING"})
    assert run_pipeline(["--launcher=slurm", "--attrib=mucs", "--what=a,tpost"] + tiny) == 0
    assert [(s["call"].stage, s.get("slurm_dependency")) for s in submitted] == [("tpost", f"afterok:{merge}")]
    assert "already queued as job" in capsys.readouterr().out
    submitted.clear()
    states[t] = "RUNNING"
    assert run_pipeline(["--launcher=slurm", "--attrib=pixel", "--what=a"] + tiny) == 0  # other method, same pre
    assert [(s["call"].stage, s.get("slurm_dependency")) for s in submitted] == [("a", f"afterok:{t}:{g}")]
    with pytest.raises(UserError, match="needs .*post_pixel/model-best.safetensors, which is missing; run --what=tp"):
        L.submit_stages(C.compose(tiny + ["launcher=slurm", "attrib=pixel"]), ["gpost"], tiny)


MUCS = ["--attrib=mucs", "attrib.num_noises=8", "attrib.null_batches=2", "attrib.max_steps=2"]


def test_shared_work_runs_once_before_the_shards(tiny, fake_slurm, capsys):
    """The calls of a sharded MUCS `a`, run in order as the prepare job, the array and the merge would: L_orig and
    L_null are computed by the prepare job alone, and no array job waits for it without depending on it."""
    submitted, _ = fake_slurm
    assert run_pipeline(["--what=tpre,gpre"] + tiny) == 0
    capsys.readouterr()
    assert run_pipeline(["--launcher=slurm", "--what=a", "launcher.a_shards=3"] + MUCS + tiny) == 0
    calls = [s["call"] for s in submitted]
    assert [(c.prepare, c.shard) for c in calls] == [(True, (0, 3)), (False, (0, 3)), (False, (1, 3)), (False, (2, 3)),
                                                     (False, (-1, 3))]
    printed = []
    for c in calls:
        c()
        printed.append(capsys.readouterr().out)
    assert "computing mucs-L_orig" in printed[0] and "computing mucs-L_null" in printed[0]
    assert not any("computing" in out for out in printed[1:])
    logs = Path(next(o for o in tiny if o.startswith("paths.logs=")).split("=", 1)[1])
    assert (logs / f"{RUN}--post_mucs" / "a.manifest.json").exists()
    submitted.clear()  # a method without shared work gets no prepare job
    assert run_pipeline(["--launcher=slurm", "--what=a", "--attrib=pixel", "targets=" + str(logs / f"{RUN}--pre" /
                         "samples.safetensors"), "launcher.a_shards=2"] + tiny) == 0
    assert [c["call"].prepare for c in submitted] == [False, False, False]


def test_logo_and_lds_run_as_arrays_of_shards(tiny, fake_slurm, capsys):
    """LOGO's trainings (one task per group by default) and LDS's models are job arrays followed by a merge job;
    running those calls, as the array tasks and the merge job would, trains every group once and scores them."""
    from mucs.logo import load_logo
    submitted, _ = fake_slurm
    assert run_pipeline(["--what=tpre,gpre"] + tiny) == 0
    assert run_pipeline(["--launcher=slurm", "--what=logo"] + tiny) == 0
    assert [(s["call"].stage, s["call"].shard) for s in submitted] == [("logo", (i, 10)) for i in range(10)] + [
        ("logo", (-1, 10))]
    assert "(10 shards) + merge" in capsys.readouterr().out
    submitted.clear()
    assert run_pipeline(["--launcher=slurm", "--what=logo", "launcher.logo_shards=3"] + tiny) == 0
    calls = [s["call"] for s in submitted]
    assert [(c.stage, c.shard) for c in calls] == [("logo", (i, 3)) for i in range(3)] + [("logo", (-1, 3))]
    array = submitted[0]["id"].split("_")[0]
    assert submitted[-1]["slurm_dependency"] == f"afterok:{array}" and "gpus_per_node" not in submitted[-1]
    logs = Path(next(o for o in tiny if o.startswith("paths.logs=")).split("=", 1)[1])
    for c in calls[:3]:
        c()
    lf = logs / f"{RUN}--logo"
    assert len(list(lf.glob("g*/logo-train.json"))) == 10 and not (lf / "logo.safetensors").exists()
    calls[3]()
    scores, meta = load_logo(lf)
    assert scores["scores"].shape == (3, 10) and torch.isfinite(scores["scores"]).all()
    submitted.clear()
    capsys.readouterr()
    assert run_pipeline(["--launcher=slurm", "--what=lds", "launcher.lds_shards=100"] + tiny) == 0
    assert [(s["call"].stage, s["call"].shard) for s in submitted] == [("lds", (i, 16)) for i in range(16)] + [
        ("lds", (-1, 16))]
    assert "lds_shards=100 capped to 16: LDS trains 16 models" in capsys.readouterr().out
    assert run_pipeline(["--launcher=slurm", "--what=logo", "launcher.logo_shards=-1"] + tiny) == 2


# ---------------------------------------------------------------------------------------------
# On the real local cluster

ROOT = Path(__file__).resolve().parent.parent
# one torch thread, and this checkout's mucs in the jobs (a shared venv's editable install may point to another)
ONE_THREAD = f'launcher.setup=["export OMP_NUM_THREADS=1","export PYTHONPATH={ROOT}"]'
CLUSTER = ["--launcher=slurm", "launcher.partition=debug", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
           "launcher.mem_gb=1", "launcher.timeout_min=5", ONE_THREAD]
TERMINAL = ("done", "failed", "cancelled")


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def over(logs, data_root, *extra):
    return TINY + [f"paths.data={data_root}", f"paths.logs={logs}", f"paths.cache={logs}/cache", *extra]


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, data_root):
    """The whole tiny pipeline run locally (random)."""
    logs = tmp_path_factory.mktemp("local") / "logs"
    with one_thread():
        assert run_pipeline(["--attrib=random"] + over(logs, data_root)) == 0
    return logs


def settle(cluster, logs, stages, timeout=150):
    """Poll the status command until every (kind, stage) in `stages` is done, failed or cancelled."""
    def ready():
        rows = {(r["kind"], r["stage"]): r for r in SS.status(logs)}
        return rows if all(k in rows and rows[k]["status"] in TERMINAL for k in stages) else None
    return cluster.wait_until(ready, timeout=timeout, interval=0.5, what=f"stages {stages} in {logs} to finish")


def same_files(a, b, names):
    for n in names:
        ta, tb = load_file(str(Path(a) / n)), load_file(str(Path(b) / n))
        assert ta.keys() == tb.keys(), n
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{n}:{k} differs"


WEIGHTS = ("model-best.safetensors", "model-last.safetensors")


@pytest.mark.slurm
def test_pipeline_on_slurm_equals_local_run(slurm_cluster, local_ref, tmp_path, data_root, capsys):
    logs = tmp_path / "logs"
    assert run_pipeline(["--attrib=random", "launcher.a_shards=2"] + CLUSTER + over(logs, data_root)) == 0
    out = capsys.readouterr().out
    assert "capped to 1" in out and f"{RUN}--slurm" in out  # 3 targets: one batch of random's 64
    rows = settle(slurm_cluster, logs, [("pre", "tpre"), ("pre", "gpre"), ("post_random", "a"),
                                        ("post_random", "tpost"), ("post_random", "gpost")])
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    pre, post = f"{RUN}--pre", f"{RUN}--post_random"
    same_files(logs / pre, local_ref / pre, WEIGHTS + ("samples.safetensors",))
    same_files(logs / post, local_ref / post, WEIGHTS + ("samples.safetensors", "attrib.safetensors"))


@pytest.mark.slurm
def test_sharded_attribution_equals_unsharded(slurm_cluster, local_ref, tmp_path, data_root):
    """150 targets of pixel (batches of 64): three shards score blocks 64 + 64 + 22 side by side."""
    assert [len(b) for i in range(3) for b in blocks(150, 64, (i, 3))] == [64, 64, 22]
    targets = tmp_path / "targets.safetensors"
    save_file({"images": torch.rand(150, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1}, str(targets))
    args = ["--what=a", "--attrib=pixel", f"targets={targets}"]
    for name in ("local", "logs"):
        shutil.copytree(local_ref / f"{RUN}--pre", tmp_path / name / f"{RUN}--pre")
    with one_thread():
        assert run_pipeline(args + over(tmp_path / "local", data_root)) == 0
    logs = tmp_path / "logs"
    assert run_pipeline(args + ["launcher.a_shards=3"] + CLUSTER + over(logs, data_root)) == 0
    rows = settle(slurm_cluster, logs, [("post_pixel", "a")])
    assert rows["post_pixel", "a"]["status"] == "done", rows
    same_files(logs / f"{RUN}--post_pixel", tmp_path / "local" / f"{RUN}--post_pixel", ("attrib.safetensors",))
    rec = SS.read_records(logs / f"{RUN}--slurm")["post_pixel", "a"]
    assert len(rec["jobs"]) == 4 and len({j.split("_")[0] for j in rec["jobs"][:3]}) == 1  # one array + merge
    completed = lambda: all(r["State"] == "COMPLETED" for j in rec["jobs"] for r in slurm_cluster.sacct(j))
    slurm_cluster.wait_until(completed, timeout=30, what="the shard and merge jobs to be COMPLETED in accounting")


@pytest.mark.slurm
def test_mucs_array_computes_shared_work_once_and_equals_local_run(slurm_cluster, local_ref, tmp_path, data_root):
    """A 3-shard MUCS array: its prepare job computes L_orig once (counted in the logs of every job of the stage),
    the shards read it, and the merged attribution equals an unsharded local run's, bit for bit."""
    for name in ("local", "logs"):
        shutil.copytree(local_ref / f"{RUN}--pre", tmp_path / name / f"{RUN}--pre")
    with one_thread():
        assert run_pipeline(["--what=a"] + MUCS + over(tmp_path / "local", data_root)) == 0
    logs = tmp_path / "logs"
    assert run_pipeline(["--what=a", "launcher.a_shards=3"] + MUCS + CLUSTER + over(logs, data_root)) == 0
    rows = settle(slurm_cluster, logs, [("post_mucs", "a")], timeout=300)
    assert rows["post_mucs", "a"]["status"] == "done", rows
    same_files(logs / f"{RUN}--post_mucs", tmp_path / "local" / f"{RUN}--post_mucs", ("attrib.safetensors",))
    rec = SS.read_records(logs / f"{RUN}--slurm")["post_mucs", "a"]
    prep, *array, merge = rec["jobs"]
    assert len(array) == 3 and len({j.split("_")[0] for j in array}) == 1 and prep not in array
    logs_out = {p.name: p.read_text() for p in (logs / f"{RUN}--slurm").glob("*_log.out")}
    assert len(logs_out) == 5, sorted(logs_out)  # prepare, 3 shards, merge
    computed = [name for name, text in logs_out.items() if "computing mucs-L_orig" in text]
    assert computed == [f"{prep}_0_log.out"], computed
    assert all("[a] shared work done" not in text for name, text in logs_out.items() if name != computed[0])


@pytest.mark.slurm
def test_logo_array_on_slurm_equals_local_run(slurm_cluster, local_ref, tmp_path, data_root):
    """LOGO's 10 group trainings as 2 array tasks side by side, then the scoring job: the same scores as one
    local process."""
    for name in ("local", "logs"):
        shutil.copytree(local_ref / f"{RUN}--pre", tmp_path / name / f"{RUN}--pre")
    with one_thread():
        assert run_pipeline(["--what=logo"] + over(tmp_path / "local", data_root)) == 0
    logs = tmp_path / "logs"
    assert run_pipeline(["--what=logo", "launcher.logo_shards=2"] + CLUSTER + over(logs, data_root)) == 0
    rows = settle(slurm_cluster, logs, [("logo", "logo")], timeout=300)
    assert rows["logo", "logo"]["status"] == "done", rows
    a, b = (load_file(str(d / f"{RUN}--logo" / "logo.safetensors")) for d in (logs, tmp_path / "local"))
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["group_sizes"], b["group_sizes"])  # not the seconds
    rec = SS.read_records(logs / f"{RUN}--slurm")["logo", "logo"]
    assert len(rec["jobs"]) == 3 and len({j.split("_")[0] for j in rec["jobs"][:2]}) == 1  # one array + merge


@pytest.mark.slurm
def test_failing_stage_stops_its_dependants_and_status_names_the_log(slurm_cluster, local_ref, tmp_path, data_root,
                                                                       capsys):
    logs = tmp_path / "logs"
    shutil.copytree(local_ref / f"{RUN}--pre", logs / f"{RUN}--pre")
    # an ensemble of scores no method has made yet passes every check at submission; the attribution job raises
    assert run_pipeline(["--what=a,tpost,gpost", "--attrib=ensemble", "attrib.methods=[pixel]"] + CLUSTER
                        + over(logs, data_root)) == 0
    stages = [("post_ensemble", s) for s in ("a", "tpost", "gpost")]
    rows = settle(slurm_cluster, logs, stages)
    assert [rows[k]["status"] for k in stages] == ["failed", "cancelled", "cancelled"], rows
    log = rows["post_ensemble", "a"]["log"]
    assert "ensemble needs the saved scores of method 'pixel'" in Path(log).read_text()
    for stage in ("tpost", "gpost"):
        (job,) = SS.read_records(logs / f"{RUN}--slurm")["post_ensemble", stage]["jobs"]
        (row,) = slurm_cluster.sacct(job, "JobID,State,NodeList")
        assert row["State"].startswith("CANCELLED") and row["NodeList"] == "None assigned", row  # never ran
    assert not (logs / f"{RUN}--post_ensemble" / "model-best.safetensors").exists()
    capsys.readouterr()
    assert cli.status_main(["--logs", str(logs), RUN]) == 0
    out = capsys.readouterr().out
    assert f"failed    job {Path(log).name.split('_0_log')[0]} (FAILED): read {log}" in out
    assert "tpost cancelled" in out and "gpost cancelled" in out


def _scontrol(*args):
    subprocess.run(["scontrol", *args], check=True, capture_output=True)


def _steps(job):
    """The job's steps still alive (the batch script, submitit's python): a requeued job may start again only
    once its first run has ended."""
    return subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True, text=True).stdout.strip()


@pytest.mark.slurm
def test_interrupted_training_resumes_with_identical_weights(slurm_cluster, tmp_path, data_root):
    """tpre is first preempted (USR2: submitit's checkpoint() requeues it), then cancelled mid-way (scancel) and
    submitted again: it resumes from train-state.pt and ends with the weights of an uninterrupted local run."""
    long = ["train.steps=600", "train.epoch_steps=100", "train.ckpt_every=2"]
    with one_thread():
        assert run_pipeline(["--what=tpre"] + over(tmp_path / "ref", data_root, *long)) == 0
    logs = tmp_path / "logs"
    args = ["--what=tpre"] + CLUSTER + over(logs, data_root, *long)
    assert run_pipeline(args) == 0
    (job,) = SS.read_records(logs / f"{RUN}--slurm")["pre", "tpre"]["jobs"]
    state = logs / f"{RUN}--pre" / "train-state.pt"
    step = lambda: torch.load(state, weights_only=True)["step"] if state.exists() else 0
    wait = slurm_cluster.wait_until
    wait(lambda: step() > 0, timeout=60, interval=0.1, what="a first training state")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what Slurm sends before a time limit
    wait(lambda: SS.slurm_states([job]).get(job) == "PENDING" and not _steps(job), timeout=30,
         what="the requeued job, its first run gone")
    at_requeue = step()
    _scontrol("update", f"JobId={job}", "StartTime=now")  # skip Slurm's 2-minute hold of requeued jobs
    wait(lambda: step() > at_requeue, timeout=60, interval=0.1, what="the requeued job to train on")
    subprocess.run(["scancel", job], check=True)
    wait(lambda: SS.slurm_states([job]).get(job) == "CANCELLED", timeout=60, what="the cancelled job")
    at_cancel = step()
    assert 0 < at_cancel < 600 and not (state.parent / "tpre.manifest.json").exists(), "finished before the cancel"
    rows = {(r["kind"], r["stage"]): r for r in SS.status(logs)}
    assert rows["pre", "tpre"]["status"] == "failed" and "CANCELLED" in rows["pre", "tpre"]["job"]

    assert run_pipeline(args) == 0  # the same command again
    rows = settle(slurm_cluster, logs, [("pre", "tpre")])
    assert rows["pre", "tpre"]["status"] == "done", rows
    (again,) = SS.read_records(logs / f"{RUN}--slurm")["pre", "tpre"]["jobs"]
    assert again != job
    assert f"resuming from {state}" in (logs / f"{RUN}--slurm" / f"{again}_0_log.out").read_text()
    same_files(logs / f"{RUN}--pre", tmp_path / "ref" / f"{RUN}--pre", WEIGHTS)
