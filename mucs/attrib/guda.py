"""`guda`: group-wise attribution by unlearning.

For each group k of training items (mucs.groups) unlearn k from a copy of the full (pre, EMA) model, then score
a query x by the change of its likelihood bound,

    dELBO_k(x) = mean_m [ L_k(x; sigma_m, eps_m) - L_full(x; sigma_m, eps_m) ],

over one fixed set of M noises (levels evenly spaced on part of the sampler's ladder, config groups.score) that
both models, every group and every query share. L is per_sample_loss: the EDM-weighted denoising loss, or for a
VP model its 1/sigma^2 weighting, i.e. the eps-prediction error whose sum over steps is the ELBO's KL terms up to
constants. Positive: x is less likely without group k. LOGO (mucs.logo) computes the same score with models
retrained without each group: the ground truth.

Unlearning group k, on a copy in eval mode (no dropout), AdamW at attrib.lr over `epochs` passes of a small paired
subset (`pairs` forget items of group k, each paired with its `neighbours` nearest retain items in pixel space),
each step a batch of forget items and as many random retain items, each with its own training noise:
  redirect (published)  L_retain + alpha * L_forget, where the forget target is redirected to the retain
                        neighbours: for x_t = x + sigma eps, the posterior mean x* = sum_i w_i r_i under the
                        Gaussian posterior w = softmax_i(-||x_t - r_i||^2 / (2 sigma^2)) over the neighbours,
                        i.e. the noise eps* = (x_t - x*) / sigma that maps x_t to them, clipped to the trust region
                        ||eps* - eps||_rms <= trust around the true noise.
  ascent                L_retain - alpha * L_forget on the forget items' own targets (plain gradient ascent).
With common_noise (default) the K unlearning runs share their random numbers step by step (retain items, noise
levels, noises, condition dropout): a query ranks the groups, so drift common to all K runs cancels from its
ranking, and what is left is what each group's forgetting did.
The K unlearned models are cached in the pre run folder (guda-cache/<key>/g<k>.safetensors, with their seconds)
and reused by every query and run. Item-level view for the five-stage pipeline: every training item gets its
group's score, so `a` ranks the top group's items first (ties in id order) and tpost removes num_removal of them.
"""
import copy
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mucs.attrib.base import Method, register
from mucs.attrib.common import ladder_noise, param_names, pre_weights
from mucs.attrib.mucs import item_noise_losses
from mucs.diffusion import per_sample_loss
from mucs.errors import UserError
from mucs.groups import expand, load_groups
from mucs.io import digest, file_hash, load_tensor_metadata
from mucs.model import labels_of, load_denoiser, save_weights
from mucs.train import step_generator

# ---------------------------------------------------------------------------------------------
# The score, shared with LOGO


def score_noise(ctx, shape):
    """The fixed noise set of groups.score: M levels on its t_range of the sampler's ladder, M unit noises."""
    sc = ctx.cfg.groups.score
    return ladder_noise(ctx, sc.num_noises, sc.t_range, sc.noise_seed, shape)


def score_labels(ctx, labels, n):
    """The conditions the queries are scored with: their own, or the zero label (groups.score.condition false)."""
    d = labels_of(ctx.train.subset([0]), ctx.cfg.model, ctx.meta)
    if d is None:
        return None
    if labels is None or not ctx.cfg.groups.score.condition:
        return torch.zeros(n, d.shape[1], device=ctx.device)
    return labels.to(ctx.device).float()


def group_delbo(ctx, model_of, K, x, labels):
    """dELBO_k(x) [Q, K] for the models model_of(k), k < K, against the full model ctx.D, on the shared noise."""
    x = x.to(ctx.device).float()
    y = score_labels(ctx, labels, len(x))
    sigmas, E = score_noise(ctx, x.shape[1:])
    batch = int(ctx.cfg.groups.score.batch)
    L_full = item_noise_losses(ctx.D, x, y, sigmas, E, batch)
    out = torch.empty(len(x), K)
    for k in range(K):
        out[:, k] = (item_noise_losses(model_of(k), x, y, sigmas, E, batch) - L_full).mean(1)
    return out


# ---------------------------------------------------------------------------------------------
# Unlearning one group


def redirect_target(x, R, sigma, eps, trust):
    """(x*, eps*) with x* + sigma eps* = x_t = x + sigma eps: x* the posterior mean of x_t over the neighbours R
    [B, n, C, H, W] under the Gaussian kernel at sigma, eps* clipped to ||eps* - eps||_rms <= trust."""
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = x + s * eps
    d2 = (x_t[:, None] - R).flatten(2).square().sum(-1)  # [B, n]
    w = (-d2 / (2 * sigma[:, None] ** 2)).softmax(1)
    x_star = (w[:, :, None, None, None] * R).sum(1)
    delta = (x - x_star) / s  # eps* - eps
    rms = delta.flatten(1).square().mean(1).sqrt().clamp_min(1e-12)
    eps_star = eps + delta * (float(trust) / rms).clamp(max=1).reshape(-1, 1, 1, 1)
    return x_t - s * eps_star, eps_star


def paired_subset(X, groups, k, cfg, seed):
    """Forget items (positions) of group k, at most cfg.pairs of them, and each one's nearest retain items."""
    forget = torch.nonzero(groups.index == k).squeeze(1)
    retain = torch.nonzero(groups.index != k).squeeze(1)
    g = torch.Generator().manual_seed(int(seed) * 1009 + int(k))
    F = forget[torch.randperm(len(forget), generator=g)[: int(cfg.pairs)]]
    n = min(int(cfg.neighbours), len(retain))
    d = torch.cdist(X[F].flatten(1).cpu(), X[retain].flatten(1).cpu())
    return F, retain, retain[d.topk(n, dim=1, largest=False).indices]


def retain_draw(groups, k, m, g):
    """m random retain items (positions) for group k: the first m of one permutation drawn from g, each item of
    group k replaced by the next items outside it, so groups drawing from the same g share every other position."""
    perm = torch.randperm(len(groups.index), generator=g)
    r, rest = perm[:m].clone(), perm[m:]
    own = groups.index[r] == k
    r[own] = rest[groups.index[rest] != k][: int(own.sum())]
    return r


def unlearn_group(ctx, cfg, groups, k, X, Y):
    """A copy of ctx.D with group k unlearned (module.__doc__), and its log."""
    if cfg.objective not in ("redirect", "ascent"):
        raise UserError(f"attrib.objective must be redirect or ascent, not {cfg.objective!r}")
    dev, seed = ctx.device, ctx.seed
    D = copy.deepcopy(ctx.D).eval()  # eval mode: no dropout
    names = param_names(D, list(cfg.params), "GUDA")
    params = dict(D.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW([params[n] for n in names], lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    F, retain, nbr = paired_subset(X, groups, k, cfg, seed)
    B = min(int(cfg.batch), len(F))
    if len(retain) < B:
        raise UserError(f"group {groups.names[k]} leaves only {len(retain)} training items to retain, fewer than one "
                        f"batch ({B}); lower attrib.batch")
    per_epoch = math.ceil(len(F) / B)
    drop = float(ctx.cfg.train.cond_dropout)
    L_ret = L_fgt = float("nan")
    stream = seed * 1009 + (0 if cfg.common_noise else 1 + k)  # common_noise: one stream for all groups (module doc)
    n_draw = int(cfg.batch)
    for step in range(int(cfg.epochs) * per_epoch):
        epoch, b = divmod(step, per_epoch)
        if b == 0:
            perm = torch.randperm(len(F), generator=step_generator(seed * 1009 + k, epoch, stream=11))
        fi = perm[b * B: (b + 1) * B]
        m = len(fi)
        g = step_generator(stream, step, stream=12)
        f, r = F[fi], retain_draw(groups, k, m, g)
        # forget half at [:m], retain half at [n:n+m] of 2n draws, n = attrib.batch: the same whatever m and k
        sel = torch.cat([torch.arange(m), n_draw + torch.arange(m)])
        sigma = D.train_sigma(2 * n_draw, generator=g)[sel].to(dev)
        eps = torch.randn((2 * n_draw,) + tuple(X.shape[1:]), generator=g)[sel].to(dev)
        lab = None
        if Y is not None:  # the training's condition dropout, so the unconditional mode forgets too
            keep = (torch.rand(2 * n_draw, generator=g)[sel] >= drop).float().to(dev)
            lab = Y[torch.cat([f, r])] * keep[:, None]
        lab_f, lab_r = (None, None) if lab is None else (lab[:m], lab[m:])
        with ctx.autocast():
            l_ret = per_sample_loss(D, X[r], sigma[m:], eps[m:], lab_r).mean()
            if cfg.objective == "redirect":
                x_star, eps_star = redirect_target(X[f], X[nbr[fi]], sigma[:m], eps[:m], cfg.trust)
                l_fgt = per_sample_loss(D, x_star, sigma[:m], eps_star, lab_f).mean()
                objective = l_ret + float(cfg.alpha) * l_fgt
            else:
                l_fgt = per_sample_loss(D, X[f], sigma[:m], eps[:m], lab_f).mean()
                objective = l_ret - float(cfg.alpha) * l_fgt
        if not torch.isfinite(objective):
            raise UserError(f"GUDA unlearning of group {groups.names[k]} became non-finite at step {step}; lower "
                            f"attrib.lr or attrib.alpha")
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        L_ret, L_fgt = l_ret.item(), l_fgt.item()
    D.requires_grad_(False)
    return D, dict(group=groups.names[k], steps=int(cfg.epochs) * per_epoch, forget_items=len(F),
                   L_retain=round(L_ret, 5), L_forget=round(L_fgt, 5))


def cache_dir(ctx, cfg, groups):
    """Where the unlearned models of these settings live: keyed by the pre weights, the training items, the groups,
    the numerics they are computed under (device type, dtype, mixed precision, TF32) and every setting the
    unlearning depends on."""
    key = dict(weights=file_hash(pre_weights(ctx)), data=ctx.data_digest(), groups=groups.digest(), seed=ctx.seed,
               unlearn={k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "groups"},
               cond_dropout=ctx.cfg.train.cond_dropout, numerics=ctx.numerics())
    ctx.uses("guda-models", digest(key))
    return Path(ctx.shared_dir) / "guda-cache" / digest(key)


def unlearned_models(ctx, cfg, groups):
    """Paths of the K unlearned models, computing the missing ones (each saved as it is finished)."""
    folder = cache_dir(ctx, cfg, groups)
    paths = [folder / f"g{k:03d}.safetensors" for k in range(len(groups))]
    todo = [k for k, p in enumerate(paths) if not p.exists()]
    if todo:
        X = ctx.train.float_images().to(ctx.device)
        Y = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        Y = None if Y is None else Y.to(ctx.device)
        for k in tqdm(todo, desc="guda unlearn", unit="group", dynamic_ncols=True):
            t0 = time.time()
            D, info = unlearn_group(ctx, cfg, groups, k, X, Y)
            save_weights(paths[k], D, dict(info, seconds=round(time.time() - t0, 3)))
    return paths


def unlearn_seconds(paths):
    return sum(load_tensor_metadata(p, what="GUDA unlearned model")["seconds"] for p in paths)


@register("guda")
class GUDA(Method):
    batch_targets = 64
    shares_work = True

    def prepare(self):
        if hasattr(self, "paths"):
            return
        ctx = self.ctx
        self.groups = load_groups(ctx.cfg.groups, ctx.train, ctx.meta)
        self.paths = unlearned_models(ctx, self.cfg, self.groups)
        self.unlearn_s = round(unlearn_seconds(self.paths), 3)  # all groups, logged with every target

    def model(self, k):
        return load_denoiser(self.ctx.cfg.model, self.ctx.meta, self.paths[k], self.ctx.device)

    def group_scores(self, x, labels):
        """dELBO_k [Q, K] of the queries x against each unlearned model."""
        self.prepare()
        return group_delbo(self.ctx, self.model, len(self.groups), x, labels)

    def score(self, x, labels, index):
        G = self.group_scores(x, labels)
        names = self.groups.names
        infos = [dict(group_scores=[round(float(v), 6) for v in row], top_group=names[int(row.argmax())],
                      groups=names, unlearn_seconds=self.unlearn_s) for row in G]
        return expand(G, self.groups), infos
