"""`ekfac`, `kfac`: influence functions with (E)K-FAC curvature, computed by kronfluence (Grosse et al. 2023) and
adapted to diffusion models as in Mlodozeniec et al. 2025, "Influence functions for scalable data attribution in
diffusion models":

    tau(x, j) = grad_theta f(x)^T (G + lambda I)^{-1} grad_theta L_j

  L_j   training item j's diffusion loss over one fixed set of M draws, the same for every item:
        (1/M) sum_m L(x_j; sigma_m, eps_m), sigma_m from the training distribution (per_sample_loss)
  f(x)  the measurement: `loss`, the target's L over the same draws (the published choice), or `elbo`, the
        denoising terms of the discrete-time ELBO over K levels sigma_0 > ... > sigma_K of the sampler's ladder,
        sum_{k<K} 1/2 (SNR(sigma_{k+1}) - SNR(sigma_k)) ||D(x + sigma_k eps_k) - x||^2, SNR = 1/sigma^2 (Kingma et
        al. 2021, Eq. 13)
  G     K-FAC or EK-FAC (eigenvalue-corrected) approximation of the Gauss-Newton Hessian of the summed training
        loss over the tracked Linear / Conv2d modules: the true Fisher of the Gaussian likelihood whose negative
        log is the loss (targets sampled around D's output), or the empirical Fisher; lambda the damping (null:
        kronfluence's 0.1 x the mean eigenvalue of each module)

Positive tau: training on j lowers the target's loss (makes it more likely), so higher = more responsible. Each
(item, draw) pair is one example for kronfluence; f and L_j sum their pairs' gradients, so item scores are sums
of pair scores (bilinear). Factors are fitted once per job in kronfluence's storage under
<run>--pre/attrib-cache/kronfluence/ and shared by every target and process, kfac and ekfac sharing the
covariances; the fitting's and scoring's seconds and peak memory go into the attribution log.
"""
import fnmatch
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mucs.attrib.base import Method, register
from mucs.attrib.common import ladder_noise, pre_weights
from mucs.diffusion import fixed_noise_generator, per_sample_loss
from mucs.errors import UserError
from mucs.io import digest, file_hash, read_json, write_json
from mucs.model import labels_of
from mucs.usage import measured

SHARES_COVARIANCE = ("ekfac", "kfac")


class Pairs(Dataset):
    """Example p = j * M + m of kronfluence: item j (image, label: width 0 when unconditional) under draw m
    (sigma_m, eps_m), the draw's weight in the summed loss, and a unit noise xi_p seeded by p (the true Fisher's
    sampled target)."""

    def __init__(self, X, labels, sigmas, E, weights, seed):
        self.X, self.sigmas, self.E, self.w, self.seed = X.cpu(), sigmas.cpu(), E.cpu(), weights.cpu(), int(seed)
        self.Y = torch.zeros(len(X), 0) if labels is None else labels.cpu()

    def __len__(self):
        return len(self.X) * len(self.sigmas)

    def __getitem__(self, p):
        j, m = divmod(p, len(self.sigmas))
        xi = torch.randn(self.X.shape[1:], generator=fixed_noise_generator(self.seed * 1_000_003 + p, stream=31))
        return self.X[j], self.Y[j], self.sigmas[m], self.E[m], self.w[m], xi


def training_draws(D, M, seed, shape):
    """The M fixed draws of the training loss: levels from D's training distribution and unit noises."""
    g = fixed_noise_generator(seed, stream=29)
    sigmas = D.train_sigma(int(M), generator=g).float()
    return sigmas, torch.randn((int(M),) + tuple(shape), generator=g)


def make_task(modules):
    from kronfluence.task import Task

    class DiffusionTask(Task):
        """The weighted per-sample diffusion loss of a batch of pairs, as training loss and as measurement."""

        def loss(self, batch, model, sample=False):
            x, y, sigma, eps, w, xi = batch
            target = None
            if sample:  # loss = -log N(x; D, P / (2 lambda) I) + const: the true Fisher's targets are drawn from it
                scale = (x[0].numel() / (2 * model.loss_weight(sigma))).sqrt().view(-1, 1, 1, 1)
                target = lambda d: d + scale * xi  # noqa: E731
            return (w * per_sample_loss(model, x, sigma, eps, y if y.shape[1] else None, target=target)).sum()

        def compute_train_loss(self, batch, model, sample=False):
            return self.loss(batch, model, sample)

        def compute_measurement(self, batch, model):
            return self.loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

    return DiffusionTask()


def tracked_modules(D, patterns):
    """(names of the Linear / Conv2d modules matching the fnmatch patterns, a note on the parameters left out)."""
    from kronfluence.module.tracked_module import TrackedModule

    names, left = [], {}
    for name, m in D.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if not own:
            continue
        supported = isinstance(m, tuple(TrackedModule.SUPPORTED_MODULES))
        if supported and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            names.append(name)
            continue
        why = "not in attrib.modules" if supported else "a type kronfluence cannot track"
        left[(type(m).__name__, why)] = left.get((type(m).__name__, why), 0) + own
    if not names:
        raise UserError(f"no Linear or Conv2d module matches attrib.modules {list(patterns)}; kronfluence tracks only "
                        f"those (e.g. attrib.modules=['*'] for all of them)")
    note = "; ".join(f"{k} ({why}): {n:,} parameters left out" for (k, why), n in sorted(left.items()))
    return names, note or "every parameter tracked"


@register("ekfac")
class InfluenceFunction(Method):
    batch_targets = 20  # targets per pass over the training pairs (their query gradients are held in memory)
    shares_work = True  # the factors, fitted once per job before the shards score

    def prepare(self):
        if hasattr(self, "analyzer"):
            return
        import copy

        from kronfluence.analyzer import Analyzer, prepare_model

        ctx, cfg = self.ctx, self.cfg
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)  # kronfluence's
        self.modules, self.note = tracked_modules(ctx.D, list(cfg.modules))
        print(f"[{self.name}] {len(self.modules)} modules tracked; {self.note}")
        X = ctx.train.float_images()
        self.labels = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        self.draws = sigmas, E = training_draws(ctx.D, cfg.num_draws, cfg.noise_seed, X.shape[1:])
        self.train_pairs = Pairs(X, self.labels, sigmas, E, torch.ones(len(sigmas)), cfg.noise_seed)
        task = make_task(self.modules)
        self.analyzer = Analyzer("kronfluence", prepare_model(copy.deepcopy(ctx.D), task), task,
                                 cpu=torch.device(ctx.device).type == "cpu", log_level=logging.WARNING,
                                 output_dir=str(Path(ctx.shared_dir) / "attrib-cache"))
        self.factors, self.fit = self.fit_factors()

    # -- factors, once per job ------------------------------------------------------------------

    def factor_key(self, strategy):
        """The factors' name in kronfluence's storage, keyed as job_cache keys its caches: the training items, the
        numerics, the pre weights, the draws (the noise set) and the rest of what the factors depend on."""
        ctx, cfg = self.ctx, self.cfg
        key = dict(data=ctx.data_digest(), numerics=ctx.numerics(), weights=file_hash(pre_weights(ctx)),
                   modules=self.modules, noise=digest(*self.draws), fisher_seed=int(cfg.noise_seed),
                   empirical=bool(cfg.empirical_fisher))
        return f"{strategy}-{digest(key)}"

    def factor_args(self, strategy):
        from kronfluence.arguments import FactorArguments

        return FactorArguments(strategy=strategy, use_empirical_fisher=bool(self.cfg.empirical_fisher),
                               covariance_max_examples=None, lambda_max_examples=None,
                               has_shared_parameters=shared_parameters(self.analyzer.model, self.train_pairs, self.modules))

    def fit_factors(self):
        """The factors' name in kronfluence's storage and the fitting's record (seconds, peak memory). Fitted once
        per job under a lock (another process waits), into a partial folder renamed when complete."""
        from mucs.lock import FolderLock

        strategy, a = self.cfg.strategy, self.analyzer
        name = self.factor_key(strategy)
        self.ctx.uses(f"kronfluence-{strategy}", name)
        done = a.factors_output_dir(name) / "fit.json"
        if done.exists():
            return name, dict(read_json(done), factors="cached")
        with FolderLock(a.output_dir, wait=86400, what=f"{self.name} factors"):
            if done.exists():
                return name, dict(read_json(done), factors="cached")
            partial = f"{name}.partial"
            shutil.rmtree(a.factors_output_dir(partial), ignore_errors=True)  # a killed fit starts over
            args, b = self.factor_args(strategy), int(self.cfg.batch)
            sibling = [self.factor_key(s) for s in SHARES_COVARIANCE if s != strategy and strategy in SHARES_COVARIANCE]
            sibling = [s for s in sibling if (a.factors_output_dir(s) / "fit.json").exists()]
            print(f"[{self.name}] fitting {strategy} factors on {len(self.train_pairs):,} (item, draw) pairs"
                  f"{' with the covariances of ' + sibling[0] if sibling else ''} -> {a.factors_output_dir(name)}")
            with measured(self.ctx.device) as u:
                if sibling:
                    a.perform_eigendecomposition(partial, factor_args=args, load_from_factors_name=sibling[0])
                    if strategy == "ekfac":
                        a.fit_lambda_matrices(partial, self.train_pairs, per_device_batch_size=b, factor_args=args)
                else:
                    a.fit_all_factors(partial, self.train_pairs, per_device_batch_size=b, factor_args=args)
            rec = dict(fit_s=u["seconds"], fit_peak_mb=u["peak_mb"], fit_pairs=len(self.train_pairs),
                       covariance_from=sibling[0] if sibling else None)
            write_json(a.factors_output_dir(partial) / "fit.json", rec)
            a.factors_output_dir(partial).rename(a.factors_output_dir(name))
        return name, dict(rec, factors="fitted")

    # -- scores -----------------------------------------------------------------------------------

    def measurement_pairs(self, x, labels):
        """The targets' pairs and the per-draw weights that make their summed loss the measurement f."""
        ctx, cfg = self.ctx, self.cfg
        if cfg.measurement == "loss":
            sigmas, E = self.draws
            w = torch.full((len(sigmas),), 1.0 / len(sigmas))
        else:  # K + 1 ladder levels; the last only closes the SNR difference of the K-th term
            sigmas, E = ladder_noise(ctx, int(cfg.num_draws) + 1, [0.0, 1.0], cfg.noise_seed, x.shape[1:])
            sigmas, E = sigmas.cpu(), E.cpu()
            snr = sigmas.double() ** -2
            P = x[0].numel()  # per_sample_loss averages over the P values of an image; the ELBO sums them
            w = (0.5 * (snr[1:] - snr[:-1]) * P / ctx.D.loss_weight(sigmas[:-1].double())).float()
            sigmas, E = sigmas[:-1], E[:-1]
        return Pairs(x, labels, sigmas, E, w, cfg.noise_seed + 1)

    def score(self, x, labels, index):
        from kronfluence.arguments import ScoreArguments

        cfg, a = self.cfg, self.analyzer
        query = self.measurement_pairs(x, None if self.labels is None else labels)
        args = ScoreArguments(damping_factor=None if cfg.damping is None else float(cfg.damping),
                              query_gradient_low_rank=cfg.query_rank,
                              query_gradient_accumulation_steps=math.ceil(len(query) / int(cfg.batch)))
        name = f"{Path(self.ctx.work_dir).name}-t{int(index[0])}-{int(time.time() * 1e6)}"
        with measured(self.ctx.device) as u:
            a.compute_pairwise_scores(name, self.factors, query, self.train_pairs, per_device_query_batch_size=int(cfg.batch),
                                      per_device_train_batch_size=int(cfg.batch), score_args=args, overwrite_output_dir=True)
            S = a.load_pairwise_scores(name)["all_modules"].double()
        shutil.rmtree(a.scores_output_dir(name), ignore_errors=True)
        T, K, n, M = len(x), len(query.sigmas), len(self.train_pairs.X), len(self.train_pairs.sigmas)
        tau = S.view(T, K, n, M).sum(1).mean(2)  # f sums its weighted pairs; L_j is the mean over its M draws
        info = dict(self.fit, score_s=round(u["seconds"] / T, 3), score_peak_mb=u["peak_mb"], modules=len(self.modules),
                    strategy=cfg.strategy, measurement=cfg.measurement)
        return tau.float(), [info for _ in range(T)]


@register("kfac")
class KFAC(InfluenceFunction):
    """The same influence with kronfluence's K-FAC (no eigenvalue correction): configs/attrib/kfac.yaml."""


def shared_parameters(model, pairs, modules):
    """Whether a tracked module runs more than once in one forward pass (kronfluence then keeps every call's
    activations): counted on one pair."""
    calls = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in model.named_modules() if n in modules]
    x, y, sigma, eps, _, _ = (t[None] for t in pairs[0])
    try:
        with torch.no_grad():
            model(x + sigma.view(-1, 1, 1, 1) * eps, sigma, y if y.shape[1] else None)
    finally:
        for h in hooks:
            h.remove()
    return any(c > 1 for c in calls.values())

