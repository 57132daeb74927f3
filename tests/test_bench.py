"""scripts/bench.py and the MUCS fast path, correctness only (no timing asserts): the straightforward loop and
the fast path give the same scores, the FLOP counter is right on known matmuls, the stage runner reads a
subprocess's CPU time and peak memory, the fused (item, noise) batches do not depend on their layout, and the
compiled evaluation matches eager with one graph for every copy of the model."""
import sys

import pytest
import torch
from omegaconf import OmegaConf

from mucs.attrib.mucs import MUCS, LossEvaluator, item_noise_losses, pairs_per_batch
from mucs.cli import run_pipeline
from mucs.config import REPO, compose
from mucs.diffusion import per_sample_loss
from mucs.errors import UserError
from mucs.stages import Job, attrib_context, targets_of

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402

MUCS_FAST = ["attrib=mucs", "attrib.num_noises=8", "attrib.null_batches=4", "attrib.eval_batch=300",
             "attrib.max_steps=4", "subsample=150", "num_attrib=1", "control_factor=1"]


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    from conftest import TINY
    root = tmp_path_factory.mktemp("bench")
    over = [o for o in TINY if not o.startswith("num_attrib")] + MUCS_FAST + [
        f"paths.{k}={root / k}" for k in ("data", "logs", "plots", "cache")]
    assert run_pipeline(["--what=tpre,gpre"] + over) == 0
    job = Job(compose(over))
    return over, job, MUCS(job.cfg.attrib, attrib_context(job))


def test_flop_counter_on_known_matmuls():
    a, b = torch.randn(64, 48), torch.randn(48, 32)
    assert bench.count_flops(lambda: a @ b) == 2 * 64 * 48 * 32
    lin = torch.nn.Linear(48, 32)
    assert bench.count_flops(lin, a) == 2 * 64 * 48 * 32  # the bias add is not a FLOP the counter counts
    assert bench.matmul_peak("cpu", n=128, reps=2) > 0


def test_eval_batch_auto_and_bad_values():
    assert pairs_per_batch("auto", torch.zeros(5, 1, 8, 8)) == 256  # CPU: cache-sized batches
    assert pairs_per_batch("auto", torch.zeros(5, 3, 32, 32)) == 5
    assert pairs_per_batch("auto", torch.zeros(5, 3, 256, 256)) == 1
    assert pairs_per_batch(100, torch.zeros(5, 1, 8, 8)) == 100
    for bad in (0, -3, "many"):
        with pytest.raises(UserError, match="eval_batch"):
            pairs_per_batch(bad, torch.zeros(5, 1, 8, 8))


def test_run_stage_reads_cpu_time_and_peak_memory(tmp_path):
    code = ("import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass")
    r = bench.run_stage([sys.executable, "-c", code], tmp_path / "log")
    assert r["peak_mb"] >= 300
    assert r["cpu_s"] >= 0.3 and r["wall_s"] >= 0.3
    with pytest.raises(UserError, match="boom"):
        bench.run_stage([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "log")


def test_fused_batches_do_not_depend_on_layout(tiny_job):
    _, job, m = tiny_job
    m.prepare()
    X, lab = m.X[:23], m.labels[:23]
    L = item_noise_losses(m.ctx.D, X, lab, m.sigmas, m.E, 7)  # batches that split items across noises
    assert L.shape == (23, len(m.sigmas))
    direct = torch.stack([per_sample_loss(m.ctx.D, X, m.sigmas[k].expand(23), m.E[k].expand_as(X), lab)
                          for k in range(len(m.sigmas))], 1)
    assert torch.allclose(L, direct, rtol=1e-5, atol=1e-7)
    assert torch.allclose(bench.straightforward_losses(m.ctx.D, X, lab, m.sigmas, m.E, 5), direct, rtol=1e-5, atol=1e-7)


def test_straightforward_loop_gives_the_fast_scores(tiny_job):
    _, job, m = tiny_job
    x, labels = targets_of(job)
    m.prepare()
    fast, info = m.score(x[:1], labels[:1], torch.tensor([0]))
    slow, info_slow = bench.straightforward_scores(m, x[:1], labels[:1], 0)
    assert info[0]["steps"] == info_slow["steps"] > 0
    assert fast.abs().max() > 0
    assert torch.allclose(fast[0], slow, rtol=1e-4, atol=1e-6)
    res = bench.compare(m, x, labels, [0], num_attrib=1, device="cpu")
    row = res["targets"][0]
    assert row["spearman"] >= 0.999 and row["speedup"] > 0 and row["fast_s"] > 0 and res["L_orig_s"] > 0
    t = bench.throughput(m, "cpu", rounds=1, pairs=64)
    one = bench.count_flops(lambda: per_sample_loss(m.ctx.D, m.X[:1], m.sigmas[:1], m.E[:1], m.labels[:1]))
    assert t["flops_per_pair"] == one > 0 and t["pairs"] == 64
    assert t["eager"]["pairs_per_s"] > 0 and 0 < t["eager"]["frac_peak"] <= t["eager"]["frac_peak_best"]


def test_compiled_evaluation_matches_eager_with_one_graph(tiny_job):
    import torch._dynamo
    _, job, m = tiny_job
    m.prepare()
    D = m.ctx.D
    D_u = m.unlearn(m.X[:1], m.labels[:1], 0)[0]
    ev = LossEvaluator(D, OmegaConf.create(dict(compile=True)), "cpu")
    X, lab = m.X[:50], m.labels[:50]
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for model in (D, D_u):  # 400 pairs in batches of 128: the last one is padded, not recompiled
        got = item_noise_losses(model, X, lab, m.sigmas, m.E, 128, ev.bind(model))
        assert torch.allclose(got, item_noise_losses(model, X, lab, m.sigmas, m.E, 128), rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1


def test_adaptive_comparison_and_its_projection(tiny_job):
    """The exact vs adaptive rows: the same unlearning, fewer passes for the adaptive run, recall in [0, 1]; and
    the projection of the pruning schedule to the published scale on hand-made fractions."""
    _, job, m = tiny_job
    x, labels = targets_of(job)
    a = bench.adaptive_compare(m, x, labels, [0], "cpu")
    row = a["targets"][0]
    assert row["exact_passes"] == len(m.X) * len(m.sigmas) >= row["adaptive_passes"] > 0
    assert 0 <= row["recall"] <= 1 and row["evaluated"][0] == len(m.X) and a["k"] == 10
    # 4 blocks of 100 noises (25 each), half the items on pass 2, a tenth on pass 3 (the last: 50 noises)
    p = bench.adaptive_projection(dict(items=10, blocks=4, targets=[dict(evaluated=[10, 5, 1])]), n=1000, M=100)
    assert p["passes"] == 1000 * 25 + 500 * 25 + 100 * 50 and p["ratio"] == round(100_000 / 42_500, 2)


def test_method_stages_time_other_methods_and_read_their_logs(tiny_job, tmp_path):
    over = [o for o in tiny_job[0] if not o.startswith("attrib")] + ["attrib.num_draws=2"]
    res = bench.method_stages(over, ["ekfac"], tmp_path / "log")
    r = res["ekfac"]
    assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_mb"] > 100
    assert r["log"]["fit_s"] > 0 and r["log"]["fit_peak_mb"] > 0 and r["log"]["score_s"] > 0
    assert r["log"]["fit_pairs"] == 150 * 2  # the job's 150 items x the 2 draws asked for
