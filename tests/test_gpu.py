"""The GPU path (needs CUDA; conftest skips these on machines without it): automatic device choice, the
TF32 switch, bf16 autocast in training and sampling, agreement of CPU and GPU, and NCCL data parallelism."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mucs import config as C
from mucs import stages as S
from mucs.cli import run_pipeline
from mucs.generate import load_samples, sample
from mucs.model import load_denoiser
from mucs.train import validation_loss

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
RUN = "digits_dit_edm_s1_k2.0_na3_sb0--pre"


def logs_of(tiny):
    return Path([o for o in tiny if o.startswith("paths.logs=")][0].split("=", 1)[1])


def test_auto_device_and_tf32(tiny):
    job = S.Job(C.compose(tiny + ["precision.tf32=false"]))
    assert job.device == "cuda" and not torch.backends.cuda.matmul.allow_tf32
    S.Job(C.compose(tiny + ["precision.tf32=true"]))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_bf16_training_and_sampling(tiny):
    assert run_pipeline(["--what=tpre,gpre", "precision.autocast=bf16"] + tiny) == 0
    run = logs_of(tiny) / RUN
    log = (run / "train_log.csv").read_text().splitlines()[1:]
    assert log and all(torch.isfinite(torch.tensor([float(v) for v in r.split(",")])).all() for r in log)
    s = load_samples(run)
    assert torch.isfinite(s["images"]).all() and s["images"].std() > 0.05


def test_cuda_agrees_with_cpu(tiny):
    """Float32 without TF32: the same weights give the same losses and samples on both devices."""
    assert run_pipeline(["--what=tpre", "device=cpu"] + tiny) == 0
    cfg = C.compose(tiny + ["precision.tf32=false"])
    job = S.Job(cfg)
    split, seeds, shape = job.test_split, list(range(8)), (1, 8, 8)
    labels = torch.eye(10)[torch.arange(8) % 10]
    out = {}
    for dev in ("cpu", "cuda"):
        D = load_denoiser(cfg.model, job.meta, job.weights(job.pre), dev)
        out[dev] = (validation_loss(D, split, job.meta, cfg.model, cfg.seed, dev, 64),
                    sample(D, cfg, seeds, labels, shape, dev))
    assert abs(out["cpu"][0] - out["cuda"][0]) < 1e-4 * abs(out["cpu"][0])
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], atol=2e-3, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_two_gpus_match_one(tiny):
    over = [o for o in tiny if not o.startswith("paths.logs=")] + ["precision.tf32=false", "train.steps=16"]
    logs = logs_of(tiny)
    assert run_pipeline(["--what=tpre", f"paths.logs={logs / 'one'}"] + over) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "pipeline.py"), "--what=tpre", f"paths.logs={logs / 'two'}"] + over,
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cuda:0 x 2 processes" in r.stdout
    a = torch.load(logs / "one" / RUN / "train-state.pt", weights_only=True)["model"]
    b = torch.load(logs / "two" / RUN / "train-state.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)


def test_bench_bf16_agreement_and_diffusers_on_cuda(tiny, tmp_path):
    """bench's bf16 vs fp32 comparison runs on CUDA and agrees closely; a diffusers run trains and samples on CUDA."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from mucs.attrib.mucs import MUCS
    assert run_pipeline(["--what=tpre,gpre"] + tiny) == 0
    job = S.Job(C.compose(tiny + ["attrib=mucs", "attrib.max_steps=3"]))
    m = MUCS(job.cfg.attrib, S.attrib_context(job))
    x, labels = S.targets_of(job)
    b = bench.bf16_agreement(m, x, labels, [0], job.device)
    assert b["targets"][0]["spearman"] > 0.9 and b["peak_bf16_gflops"] > 0 and b["peak_memory_mb"] > 0
    ddpm = ["job=digits_ddpm"] + [o for o in tiny if o.startswith(("paths.", "train.", "num_attrib", "control"))]
    assert run_pipeline(["--what=tpre,gpre", "sample.num_steps=4"] + ddpm) == 0
