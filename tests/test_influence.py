"""Influence functions through kronfluence (ekfac, kfac) and journey-TRAK: known answers on a linear denoiser small
enough for its exact Hessian, the factors' storage and sharing, the trajectories journey-TRAK attributes, planted
copies ranked first, and both methods through every stage that takes a method (a, ensemble, LDS, eval, report) on
the toolkit's DiT and on diffusers backbones."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call

from mucs.attrib.base import Context, get_method
from mucs.cli import run_eval, run_pipeline
from mucs.config import compose, post_dir
from mucs.diffusion import EDMPrecond, fixed_noise_generator, ladder_at
from mucs.errors import UserError
from mucs.io import save_tensors
from mucs.model import save_weights
from mucs.stages import Job, attrib_context, targets_of
from test_baselines import COPIES, context, env, held_out_copy, job, planted  # noqa: F401  (fixtures)

FAST = {"ekfac": ["attrib.num_draws=2"], "kfac": ["attrib.num_draws=2"], "journey_trak": ["attrib.steps=2", "attrib.proj_dim=64"]}


# ---------------------------------------------------------------------------------------------
# known answers on a linear denoiser: D(x, sigma) = c_skip x + c_out (W c_in x + b), 20 parameters


class LinearNet(nn.Module):
    def __init__(self, P):
        super().__init__()
        self.lin = nn.Linear(P, P)

    def forward(self, x, c_noise, labels=None, augment_labels=None):
        return self.lin(x.flatten(1)).view_as(x)


def linear_method(tmp_path, n=400, sigma=None, *over):
    """A method of attrib=<over> on the linear denoiser and n random 2x2 training images; with `sigma` every training
    draw has that level (the Gauss-Newton Hessian is then exactly Kronecker-factored)."""
    torch.manual_seed(0)
    D = EDMPrecond(LinearNet(4)).eval().requires_grad_(False)
    if sigma is not None:
        D.train_sigma = lambda k, generator=None: torch.full((k,), sigma)
    X = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.5
    (tmp_path / "pre").mkdir(exist_ok=True)
    save_weights(tmp_path / "pre" / "model-best.safetensors", D)
    cfg = compose(["model.conditional=false", "attrib.batch=512"] + list(over))
    train = SimpleNamespace(float_images=lambda: X, images=X, ids=torch.arange(n), labels=torch.zeros(n, dtype=torch.long),
                            conds=None)
    ctx = Context(cfg, D, train, dict(cond="none", num_classes=0), "cpu", tmp_path / "pre", tmp_path / "post")
    m = get_method(cfg.attrib.name)(cfg.attrib, ctx)
    m.prepare()
    return m, D, X


def item_losses(D, theta, x, sigmas, E, w=None):
    """The weighted per-draw losses of items x [b] summed over the draws: [b], with parameters theta (flat)."""
    names = [k for k, _ in D.named_parameters()]
    shapes = [p.shape for _, p in D.named_parameters()]
    params = dict(zip(names, torch.split(theta, [s.numel() for s in shapes])))
    params = {k: v.view(s).float() for (k, v), s in zip(params.items(), shapes)}
    b, K = len(x), len(sigmas)
    xs, s, e = x.repeat_interleave(K, 0), sigmas.repeat(b), E.repeat(b, 1, 1, 1)
    d = functional_call(D, params, (xs + s.view(-1, 1, 1, 1) * e, s))
    L = D.loss_weight(s) * (d - xs).square().flatten(1).mean(1)
    w = torch.full((K,), 1 / K) if w is None else w
    return (L.view(b, K) * w).sum(1).double()


def flat(D):
    return torch.cat([p.flatten() for _, p in D.named_parameters()]).double()


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_ekfac_and_kfac_give_the_exact_hessian_influence_of_a_linear_denoiser(tmp_path, strategy):
    """The loss is quadratic in the parameters, so its Hessian is the Gauss-Newton matrix; at one noise level it is
    exactly A (x) G, which K-FAC and EK-FAC represent exactly. With every module tracked and no damping, both give
    g_q^T H^{-1} g_j up to the Monte Carlo estimate of the true Fisher (targets sampled around D): a few percent."""
    m, D, X = linear_method(tmp_path, 400, 0.7, f"attrib={strategy}", "attrib.damping=0", "attrib.num_draws=8")
    q = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(5)) * 0.5
    tau, info = m.score(q, None, torch.arange(3))
    sigmas, E = m.draws
    theta = flat(D)
    H = torch.autograd.functional.hessian(lambda t: item_losses(D, t, X, sigmas, E).mean(), theta)
    g_train = torch.autograd.functional.jacobian(lambda t: item_losses(D, t, X, sigmas, E), theta)
    g_q = torch.autograd.functional.jacobian(lambda t: item_losses(D, t, q, sigmas, E), theta)
    exact = g_q @ torch.linalg.solve(H, g_train.T)
    assert ((tau.double() - exact).norm() / exact.norm()) < 0.1
    assert all(spearmanr(tau[i], exact[i]).statistic > 0.99 for i in range(3))
    assert info[0]["strategy"] == strategy and info[0]["fit_s"] > 0 and info[0]["fit_peak_mb"] > 0
    assert info[0]["score_peak_mb"] > 0 and info[0]["score_s"] > 0
    # damping pulls the scores towards the plain gradient inner products' ranking: they change
    md, _, _ = linear_method(tmp_path, 400, 0.7, f"attrib={strategy}", "attrib.damping=10", "attrib.num_draws=8")
    assert ((md.score(q, None, torch.arange(3))[0].double() - exact).norm() / exact.norm()) > 0.2


@pytest.mark.parametrize("measurement", ["loss", "elbo"])
def test_identity_strategy_is_the_gradient_inner_product_of_measurement_and_training_loss(tmp_path, measurement):
    """kronfluence's identity strategy (no curvature) gives grad f(q) . grad L_j exactly: the (item, draw) pairs are
    summed into items as the loss and the measurement define them. The ELBO measurement written out here:
    sum_k 1/2 (1/sigma_{k+1}^2 - 1/sigma_k^2) ||D(x + sigma_k eps_k) - x||^2 over the ladder's levels."""
    m, D, X = linear_method(tmp_path, 30, None, "attrib=ekfac", "attrib.strategy=identity", "attrib.num_draws=5",
                            f"attrib.measurement={measurement}")
    q = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(5)) * 0.5
    tau, _ = m.score(q, None, torch.arange(2))
    sigmas, E = m.draws
    theta = flat(D)
    g_train = torch.autograd.functional.jacobian(lambda t: item_losses(D, t, X, sigmas, E), theta)
    if measurement == "loss":
        f = lambda t: item_losses(D, t, q, sigmas, E)  # noqa: E731
    else:
        u = torch.linspace(0, 1, 6, dtype=torch.float64)
        s = ladder_at(u, m.ctx.cfg.sample, D)
        E_m = torch.randn((6, 1, 2, 2), generator=fixed_noise_generator(m.cfg.noise_seed, stream=23))
        # per_sample_loss is lambda(sigma) ||D - x||^2 / P: the ELBO term is its 1/2 (SNR' - SNR) P / lambda multiple
        w = 0.5 * (s[1:] ** -2 - s[:-1] ** -2) * 4 / D.loss_weight(s[:-1])
        f = lambda t: item_losses(D, t, q, s[:-1].float(), E_m[:-1], w.float())  # noqa: E731
    g_q = torch.autograd.functional.jacobian(f, theta)
    torch.testing.assert_close(tau.double(), g_q @ g_train.T, rtol=1e-4, atol=1e-4 * (g_q @ g_train.T).abs().max().item())


def test_factors_are_fitted_once_per_job_and_shared_by_kfac(tmp_path):
    m, _, _ = linear_method(tmp_path, 50, None, "attrib=ekfac", "attrib.num_draws=2")
    root = tmp_path / "pre" / "attrib-cache" / "kronfluence"
    assert m.fit["factors"] == "fitted" and [d.name for d in root.iterdir()] == [f"factors_{m.factors}"]
    again, _, _ = linear_method(tmp_path, 50, None, "attrib=ekfac", "attrib.num_draws=2")
    assert again.fit["factors"] == "cached" and again.fit["fit_s"] == m.fit["fit_s"]
    k, _, _ = linear_method(tmp_path, 50, None, "attrib=kfac", "attrib.num_draws=2")
    assert k.fit["covariance_from"] == m.factors
    cov = lambda name: load_file(str(root / f"factors_{name}" / "activation_covariance.safetensors"))  # noqa: E731
    assert all(torch.equal(v, cov(m.factors)[n]) for n, v in cov(k.factors).items())
    # a fit killed half-way (its partial folder left behind) starts over; other settings are other factors
    (root / f"factors_{m.factors}.partial").mkdir()
    other, _, _ = linear_method(tmp_path, 50, None, "attrib=ekfac", "attrib.num_draws=3")
    assert other.factors != m.factors and other.fit["factors"] == "fitted"


def test_untracked_parameters_are_named_and_bad_settings_refused(job):  # noqa: F811
    from mucs.attrib.ekfac import tracked_modules
    _, ctx = context(job, "random")
    names, note = tracked_modules(ctx.D, ["net.blocks.*"])
    assert names and all(n.startswith("net.blocks.") for n in names)
    assert "DiT (a type kronfluence cannot track): 64 parameters left out" in note  # the extra tokens
    assert "Linear (not in attrib.modules)" in note
    from mucs.model import build_denoiser  # the toolkit's DDPM++ UNet: its convolutions tracked, GroupNorm named
    unet = build_denoiser(compose(["job=digits_unet_edm"]).model, dict(resolution=8, channels=1, num_classes=10, cond="class"))
    names, note = tracked_modules(unet, ["*"])
    assert any(n.endswith("conv0") for n in names) and note.startswith("GroupNorm (a type kronfluence cannot track)")
    with pytest.raises(UserError, match="no Linear or Conv2d module matches") as e:
        tracked_modules(ctx.D, ["net.nothing.*"])
    assert "\n" not in str(e.value)
    for bad, what in (("attrib.strategy=exact", "strategy"), ("attrib.measurement=kl", "measurement"),
                      ("attrib.damping=-1", "damping")):
        with pytest.raises(UserError, match=what):
            context(job, "ekfac", bad)
    for bad, what in (("attrib.anchor=end", "anchor"), ("attrib.aggregate=max", "aggregate"), ("attrib.noises=0", "noises")):
        with pytest.raises(UserError, match=what):
            context(job, "journey_trak", bad)


# ---------------------------------------------------------------------------------------------
# planted copies and journey-TRAK's trajectories


@pytest.mark.parametrize("method", ["ekfac", "kfac", "journey_trak"])
def test_planted_copies_rank_first(job, planted, tmp_path, method):  # noqa: F811
    """Near-copies of the target are its most influential items; for journey-TRAK at the trajectory's last step
    (the steps before it attribute the coarse shape the target shares with its class)."""
    from mucs.attrib.journey_trak import STEPS
    x, y = held_out_copy(planted)
    save_tensors(tmp_path / "t.safetensors", dict(images=x))
    m, ctx = context(job, method, *FAST[method], f"targets={tmp_path / 't.safetensors'}")  # journey: forward-noised
    m.prepare()
    s, info = m.score(x, y, torch.tensor([0]))
    assert s.shape == (1, len(ctx.train)) and torch.isfinite(s).all()
    if method == "journey_trak":
        assert info[0]["trajectory"] == "forward-noised"
        s = load_file(str(ctx.work_dir / STEPS / "t00000.safetensors"))["scores"][-1:]
    top = ctx.train.ids[s[0].argsort(descending=True)[:6]].tolist()
    assert len(set(top) & set(COPIES)) >= 5, (method, top)


def test_journey_regenerates_each_targets_trajectory_and_keeps_its_step_scores(job):  # noqa: F811
    from mucs.attrib.journey_trak import STEPS
    from mucs.diffusion import SeedGenerators
    from mucs.generate import load_samples
    m, ctx = context(job, "journey_trak", "attrib.steps=3", "attrib.proj_dim=64", "attrib.aggregate=rank")
    m.prepare()
    jb = Job(compose(list(job) + ["attrib=journey_trak"]))
    x, y = targets_of(jb)
    idx = torch.tensor([2, 0])
    states, sigmas, how = m.trajectories(x[idx], y[idx], idx)
    N = int(jb.cfg.sample.num_steps)
    assert how == "regenerated" and states.shape == (N, 2) + tuple(x.shape[1:]) and len(sigmas) == N
    seeds = load_samples(ctx.shared_dir)["seeds"][idx].tolist()
    assert torch.allclose(states[0], SeedGenerators(seeds).randn(x.shape[1:]) * sigmas[0])  # starts at its seed's noise
    assert float(sigmas[0]) == pytest.approx(80.0) and (sigmas[1:] < sigmas[:-1]).all()
    s, info = m.score(x[idx], y[idx], idx)
    steps = load_file(str(ctx.work_dir / STEPS / "t00002.safetensors"))
    assert steps["scores"].shape == (3, len(ctx.train)) and steps["steps"].tolist() == [0, N // 2, N - 1]
    from mucs.attrib.ensemble import normalise
    torch.testing.assert_close(s[0].double(), torch.stack([normalise(steps["scores"][k][None], "rank")[0]
                                                           for k in range(3)]).mean(0), rtol=1e-5, atol=1e-5)
    assert info[0]["steps"] == 3 and info[0]["trajectory"] == "regenerated"
    # a target that is not where its seed's trajectory ends is refused in one line
    with pytest.raises(UserError, match="redo gpre"):
        m.trajectories(x[idx] + 0.5, y[idx], idx)


# ---------------------------------------------------------------------------------------------
# every stage that takes a method


def test_through_a_ensemble_lds_eval_and_report(tiny, tmp_path, capsys):
    from mucs.reporting import write_report
    tiny = [o for o in tiny if not o.startswith("train.steps=")] + ["train.steps=8"]
    for m in ("random", "ekfac", "journey_trak"):
        assert run_pipeline(["--what=tpre,gpre,a,tpost,gpost", f"--attrib={m}"] + FAST.get(m, []) + tiny) == 0, m
    assert run_pipeline(["--what=a", "--attrib=kfac"] + FAST["kfac"] + tiny) == 0
    assert run_pipeline(["--what=a", "--attrib=ensemble", "attrib.methods=[ekfac,journey_trak]"] + tiny) == 0
    cfg = compose(tiny + ["attrib=ekfac"])
    log = [json.loads(r) for r in (post_dir(cfg) / "attrib_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["fit_peak_mb"] > 0 and r["score_s"] > 0 for r in log)
    assert log[0]["factors"] == "fitted" and all(r["fit_s"] == log[0]["fit_s"] for r in log)
    ens = load_file(str(post_dir(cfg, "ensemble") / "attrib.safetensors"))["scores"]
    assert ens.shape == (3, 1500) and torch.isfinite(ens).all()
    capsys.readouterr()
    assert run_pipeline(["--what=lds", "lds.num_subsets=3", "lds.num_seeds=1", "lds.steps=8", "lds.num_noises=4"]
                        + tiny) == 0
    table = capsys.readouterr().out
    assert all(m in table for m in ("ekfac", "kfac", "journey_trak", "ensemble"))
    paths = [o for o in tiny if o.startswith("paths.")]
    run = "digits_dit_edm_s1_k2.0_na3_sb0"
    assert run_eval([f"--jobs={run}", "--methods=random,ekfac,journey_trak", "--fn_out=ev", "--metrics=ssim"] + paths) == 0
    logs = Path(cfg.paths.logs)
    page = write_report(Path(cfg.paths.plots) / "ev", logs, top=3).read_text()
    for m in ("ekfac", "journey_trak"):
        top = load_file(str(post_dir(cfg, m) / "attrib.safetensors"))["top_ids"]
        assert f"{m} {' '.join(map(str, top[0, :3].tolist()))}" in page


@pytest.mark.parametrize("model", ["diffusers_unet", "diffusers_dit"])
def test_diffusers_backbones(tmp_path, data_root, model):
    from test_diffusers import TINY_DDPM
    net = [] if model == "diffusers_unet" else [  # the job's UNet settings replaced by a one-block DiT's
        "model=diffusers_dit", "model.conditional=true", "~model.net_kwargs=null",
        "+model.net_kwargs={num_layers:1,num_attention_heads:2,attention_head_dim:8,patch_size:2}"]
    over = ["job=digits_ddpm"] + TINY_DDPM + net + [f"paths.{k}={tmp_path / k}" for k in ("logs", "plots", "cache")] + [
        f"paths.data={data_root}"]
    for m in ("ekfac", "journey_trak"):
        assert run_pipeline(["--what=tpre,gpre,a", f"--attrib={m}"] + FAST[m] + over) == 0, m
        a = load_file(str(post_dir(compose(over + [f"attrib={m}"])) / "attrib.safetensors"))
        assert a["scores"].shape == (3, 1500) and torch.isfinite(a["scores"]).all() and a["scores"].std() > 0
