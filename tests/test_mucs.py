"""MUCS known-answer tests: planted near-copies rank first, no unlearning gives zero scores, the cached
pre-model losses equal a fresh computation, and each ablation switch changes what it should."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from mucs.attrib.mucs import MUCS, instance_weights, item_noise_losses
from mucs.cli import run_pipeline
from mucs.config import compose
from mucs.data import load_split
from mucs.stages import Job, attrib_context, targets_of
from conftest import write_planted

FAST = ["attrib=mucs", "attrib.num_noises=16", "attrib.null_batches=10", "attrib.eval_batch=2048",
        "attrib.max_steps=30"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    write_planted(root / "planted", 300)
    return root


def make_job(tiny, planted, extra=()):
    over = [o for o in tiny if not o.startswith(("train.steps", "num_attrib", "data.num_removal_base"))]
    over += ["data.name=planted", f"data.folder={planted / 'planted'}", "train.steps=300", "train.epoch_steps=100",
             "train.batch=64", "train.lr=2e-3", "train.ema=0.95", "num_attrib=1", "control_factor=0", "data.num_removal_base=6",
             "sample.surplus=1", "sample.num_steps=8", "model.net_kwargs.width=64", "model.net_kwargs.cond_width=64"]
    return over + FAST + list(extra)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    from conftest import TINY
    logs = tmp_path_factory.mktemp("logs")
    tiny = TINY + [f"paths.logs={logs}", f"paths.plots={logs}/plots", f"paths.cache={logs}/cache"]
    over = make_job(tiny, planted)
    assert run_pipeline(["--what=tpre"] + over) == 0
    return over


def context(over, *extra):
    job = Job(compose(list(over) + list(extra)))
    return job, attrib_context(job)


def target_copy(planted):
    """The held-out 7th copy, as the target image and its one-hot condition."""
    te = load_split(planted / "planted", "test")
    return te.float_images()[:1], torch.nn.functional.one_hot(te.labels[:1], 10).float()


def test_planted_copies_rank_first(trained, planted):
    job, ctx = context(trained)
    m = MUCS(job.cfg.attrib, ctx)
    m.prepare()
    x, y = target_copy(planted)
    scores, info = m.score(x, y, torch.tensor([0]))
    top = ctx.train.ids[scores[0].argsort(descending=True)[:6]]
    assert info[0]["steps"] > 0
    assert len(set(top.tolist()) & set(range(1000, 1006))) >= 5, (top, info)


def test_no_unlearning_gives_zero_scores(trained, planted):
    job, ctx = context(trained, "attrib.max_steps=0")
    m = MUCS(job.cfg.attrib, ctx)
    m.prepare()
    x, y = target_copy(planted)
    scores, info = m.score(x, y, torch.tensor([0]))
    assert info[0]["steps"] == 0
    assert torch.equal(scores, torch.zeros_like(scores))
    # with fresh noise for the unlearned model the same unchanged model gives non-zero scores
    job, ctx = context(trained, "attrib.max_steps=0", "attrib.consistent_noise=false")
    m = MUCS(job.cfg.attrib, ctx)
    m.prepare()
    assert m.score(x, y, torch.tensor([0]))[0].abs().max() > 1e-3


def test_cached_pre_losses_equal_fresh_computation(trained):
    job, ctx = context(trained)
    m = MUCS(job.cfg.attrib, ctx)
    m.prepare()
    files = list((ctx.shared_dir / "attrib-cache").glob("mucs-L_orig-*.safetensors"))
    assert files
    again = MUCS(job.cfg.attrib, ctx)
    again.prepare()  # loads the cache
    fresh = item_noise_losses(ctx.D, m.X, m.labels, m.sigmas, m.E, 512)  # another batch layout
    assert torch.allclose(again.L_orig, fresh, rtol=1e-4, atol=1e-6)
    assert again.L_orig.shape == (len(ctx.train), 16)
    # the cache key follows the noise settings: another t_sched_infer is another file
    job2, ctx2 = context(trained, "attrib.t_sched_infer=0.5")
    MUCS(job2.cfg.attrib, ctx2).prepare()
    assert len(list((ctx.shared_dir / "attrib-cache").glob("mucs-L_orig-*.safetensors"))) == len(files) + 1


def test_ablation_switches(trained, planted):
    x, y = target_copy(planted)
    job, ctx = context(trained, "attrib.max_steps=3")
    m = MUCS(job.cfg.attrib, ctx)
    m.prepare()
    # noise levels: M levels from sigma_max down to the ladder at t_sched_infer
    from mucs.diffusion import ladder_at
    assert m.sigmas[0].item() == pytest.approx(80.0, rel=1e-5)
    assert m.sigmas[-1].item() == pytest.approx(float(ladder_at(0.7, job.cfg.sample, ctx.D)), rel=1e-5)
    _, ctx5 = context(trained, "attrib.max_steps=3", "attrib.t_sched_infer=0.5")
    m5 = MUCS(job.cfg.attrib.copy(), ctx5)
    m5.cfg = OmegaConf.merge(job.cfg.attrib, {"t_sched_infer": 0.5})
    m5.prepare()
    assert m5.sigmas[-1] > m.sigmas[-1] and m5.sigmas[0] == m.sigmas[0]
    # step cap
    D_u, info = m.unlearn(x, y, 0)
    assert info["steps"] == 3 and info["stop"] == "max_steps"
    # diff vs ratio: the two score formulas on the same losses
    L_unl = item_noise_losses(D_u, m.X, m.labels, m.sigmas, m.E, 2048)
    ratio = m.skew(L_unl, m.L_orig)
    m.cfg = OmegaConf.merge(m.cfg, {"score": "diff"})
    diff = m.skew(L_unl, m.L_orig)
    assert torch.allclose(diff, (L_unl - m.L_orig).mean(1))
    assert torch.allclose(ratio, ((L_unl - m.L_orig) / (L_unl + m.L_orig + 1e-3)).mean(1))
    # lambda and tolerance: no pull on the target (lambda 0) never reaches L_null within the cap; a loose
    # tolerance stops sooner than a strict one
    steps = {}
    for lam, tol in ((0.2, 0.05), (0.2, 0.5), (0.0, 0.05)):
        mm = MUCS(OmegaConf.merge(job.cfg.attrib, {"lam": lam, "tolerance": tol, "max_steps": 40}), ctx)
        mm.prepare()
        steps[(lam, tol)] = mm.unlearn(x, y, 0)[1]
    assert steps[(0.2, 0.5)]["steps"] < steps[(0.2, 0.05)]["steps"]
    assert steps[(0.0, 0.05)]["L_gen"] < steps[(0.2, 0.05)]["L_gen"]


def test_instance_weighting_switch(trained, planted):
    """inverse_loss weights each instance by 1 / its loss (mean 1 per half): its gradient is that of the mean
    log-loss times a constant, it moves the weights differently from the published unweighted objective, and
    its default (none) is left out of the recorded settings."""
    L = torch.tensor([0.5, 1.0, 2.0, 4.0], requires_grad=True)
    w = instance_weights(L)
    wl = (w * L).detach()  # every instance weighs in with the same product: its relative change counts
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and torch.allclose(wl, wl[0].expand(4))
    (w * L).mean().backward()
    assert not w.requires_grad and torch.allclose(L.grad, w / 4)  # = grad of mean(log L) / mean(1 / L)
    x, y = target_copy(planted)
    models = {}
    for how in ("none", "inverse_loss"):
        job, ctx = context(trained, "attrib.max_steps=3", f"attrib.instance_weighting={how}")
        m = MUCS(job.cfg.attrib, ctx)
        m.prepare()
        models[how], info = m.unlearn(x, y, 0)
        assert info["steps"] == 3
    moved = {n: (p - dict(ctx.D.named_parameters())[n]).abs().max() for n, p in models["none"].named_parameters()}
    differ = {n: (p - dict(models["none"].named_parameters())[n]).abs().max()
              for n, p in models["inverse_loss"].named_parameters()}
    assert max(moved.values()) > 0 and max(differ.values()) > 1e-3 * max(moved.values())
    from mucs.manifest import settings_of
    assert "instance_weighting" not in settings_of(compose(trained), ["attrib"])["attrib"]
    assert settings_of(compose(trained + ["attrib.instance_weighting=inverse_loss"]), ["attrib"])["attrib"][
        "instance_weighting"] == "inverse_loss"


def test_attribution_stage_logs_every_target(trained, planted, tmp_path):
    """The real `a` stage on user-supplied targets (a folder of PNGs): one log row per target."""
    from PIL import Image
    te = load_split(planted / "planted", "test")
    for i in range(2):
        Image.fromarray(te.images[i, 0].numpy()).save(tmp_path / f"t{i}.png")
    over = list(trained) + [f"targets={tmp_path}"]
    assert run_pipeline(["--what=a"] + over) == 0
    job = Job(compose(over))
    rows = [json.loads(line) for line in (job.post / "attrib_log.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == [0, 1]
    for r in rows:
        assert {"stop", "steps", "L_retain", "L_gen", "L_null", "seconds"} <= set(r)
    x, _ = targets_of(job)
    assert torch.allclose(x, te.float_images()[:2])


def test_adaptive_evaluation_keeps_the_exact_top_k(tiny):
    """attrib.adaptive: the candidates get every noise (their scores equal the exact run's), pruned items fewer
    and rank below them; the noises per item are saved; the top num_removal ids equal the exact ones."""
    import json
    from pathlib import Path
    from safetensors.torch import load_file
    from mucs.cli import run_pipeline

    logs = Path([o for o in tiny if o.startswith("paths.logs=")][0].split("=", 1)[1])
    common = ["--what=tpre,gpre,a", "--attrib=mucs", "attrib.max_steps=3", "job_attrib.mucs.num_noises=16"]
    assert run_pipeline(common + tiny) == 0
    post = logs / "digits_dit_edm_s1_k2.0_na3_sb0--post_mucs"
    exact = load_file(str(post / "attrib.safetensors"))
    other = [o if not o.startswith("paths.logs=") else f"paths.logs={logs / 'adaptive'}" for o in tiny]
    assert run_pipeline(common + other + ["attrib.adaptive=true"]) == 0
    ad_post = logs / "adaptive" / post.name
    ad = load_file(str(ad_post / "attrib.safetensors"))
    M = 16
    assert (exact["noises"] == M).all() and (ad["noises"] <= M).all() and (ad["noises"] < M).any()
    full = ad["noises"] == M
    torch.testing.assert_close(ad["scores"][full], exact["scores"][full], rtol=1e-5, atol=1e-6)
    for t in range(len(ad["scores"])):
        assert ad["scores"][t][~full[t]].max() < ad["scores"][t][full[t]].min()
    assert torch.equal(ad["top_ids"], exact["top_ids"])
    log = [json.loads(line) for line in (ad_post / "attrib_log.jsonl").read_text().splitlines()]
    assert all(r["forward_passes"] == int(n) for r, n in zip(log, ad["noises"].sum(1)))
