"""Data-parallel training on CPU (gloo): two processes, started by torchrun or as the tasks of one submitit
job, reach the weights of one process on the same global batch, up to float rounding; only rank 0 writes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mucs.cli import run_pipeline
from mucs.distributed import World, world_from_env
from test_presets import build_tiny_datasets, one_thread, tiny_overrides  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
RUN = "cifar10_dit_edm_s1_k2.0_na2_sb0--pre"
# The CIFAR-10 DiT-EDM preset (augmentation on), shrunk; a batch of 7 splits unevenly (3 + 4), and so do
# the 9 validation items. Dropout off: its masks are drawn per process.
DDP = ["model.net_kwargs.dropout=0.0", "train.batch=7", "train.steps=6", "train.epoch_steps=3", "train.val_items=9",
       "train.warmup_steps=2", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference run: (data root, its train state, its log)."""
    root = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest
    data = build_tiny_datasets(root / "data")
    assert run_pipeline(["--what=tpre"] + tiny_overrides("cifar10_dit_edm", data, root / "one") + DDP) == 0
    torch.set_num_threads(threads)
    run = root / "one" / RUN
    return data, torch.load(run / "train-state.pt", weights_only=True), (run / "train_log.csv").read_text()


def check_same(single, run):
    _, ref, ref_log = single
    st = torch.load(run / "train-state.pt", weights_only=True)
    assert st["step"] == ref["step"] == 6
    moved = max((ref["model"][k] - st0).abs().max().item() for k, st0 in initial_weights().items())
    assert moved > 1e-3  # the updates are far above the tolerance below
    for part in ("model", "ema"):
        for k, v in ref[part].items():
            torch.testing.assert_close(st[part][k], v, atol=2e-6, rtol=1e-5, msg=f"{part}.{k}")
    rows = [list(map(float, r.split(","))) for r in (run / "train_log.csv").read_text().splitlines()[1:]]
    ref_rows = [list(map(float, r.split(","))) for r in ref_log.splitlines()[1:]]
    assert len(rows) == len(ref_rows) == 2
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(ref_rows), atol=1e-6, rtol=1e-5)


def initial_weights():
    from mucs import config as C
    from mucs.model import build_denoiser

    cfg = C.compose([o.lstrip("-") for o in tiny_overrides("cifar10_dit_edm", "/unused", "/unused")] + DDP)
    torch.manual_seed(cfg.seed)
    meta = dict(resolution=32, channels=3, cond="class", num_classes=10, cond_dim=0)
    return build_denoiser(cfg.model, meta).state_dict()


def env_without_dist():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "SUBMITIT_EXECUTOR")}
    return dict(env, OMP_NUM_THREADS="1")


def test_torchrun_two_processes_match_one(single, tmp_path):
    data = single[0]
    args = ["--what=tpre"] + tiny_overrides("cifar10_dit_edm", data, tmp_path / "two") + DDP
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "pipeline.py")] + args, capture_output=True, text=True, cwd=ROOT, timeout=240,
                       env=env_without_dist())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stdout and r.stdout.count("[tpre] done in") == 1, r.stdout  # rank 0 speaks
    check_same(single, tmp_path / "two" / RUN)
    assert (tmp_path / "two" / RUN / "tpre.manifest.json").exists()


def test_submitit_tasks_two_processes_match_one(single, tmp_path, monkeypatch):
    import submitit

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = submitit.LocalExecutor(folder=tmp_path / "submitit")  # chosen explicitly: never Slurm here
    ex.update_parameters(tasks_per_node=2, timeout_min=5)
    args = ["--what=tpre"] + tiny_overrides("cifar10_dit_edm", single[0], tmp_path / "two") + DDP
    job = ex.submit(run_pipeline, args)
    assert job.results() == [0, 0]
    out = [job.task(i).stdout() for i in range(2)]
    assert "x 2 processes" in out[0] and "[tpre] done in" in out[0] and "[tpre] done in" not in out[1]  # one world
    check_same(single, tmp_path / "two" / RUN)


def test_world_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == World()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = world_from_env()
    assert (w.rank, w.size, w.local_rank, w.main) == (3, 4, 1, False)
    # a global batch is cut into contiguous rows, every item exactly once, sizes differing by at most one
    for n in (4, 7, 128, 130):
        rows = [World(r, 4).rows(n) for r in range(4)]
        got = [i for s in rows for i in range(n)[s]]
        assert got == list(range(n)) and max(len(range(n)[s]) for s in rows) - min(len(range(n)[s]) for s in rows) <= 1


def test_batch_smaller_than_world_is_refused(tmp_path, data_root):
    from mucs import config as C
    from mucs.data import ensure_dataset, load_split
    from mucs.errors import UserError
    from mucs.train import train

    cfg = C.compose([f"paths.data={data_root}", "train.batch=1"])
    meta = ensure_dataset(cfg.data.name, cfg.data.folder)
    split = load_split(cfg.data.folder, "train")
    with pytest.raises(UserError, match="train.batch 1 is smaller than the 2 data-parallel processes"):
        train(cfg, split, split, meta, tmp_path, world=World(0, 2))
