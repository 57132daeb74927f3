"""`mucs`: mirrored unlearning with noise-consistent skew.

1. Unlearn the target x_g from a copy of the pre model: AdamW at lr / lr_factor on a few parameter
   groups, minimising  mean(L_retain) - lambda * mean(min(L_gen, L_null))  over B retain items and B
   copies of x_g, each with its own training noise; stop once mean(min(L_gen, L_null)) reaches
   (1 - tolerance) L_null. Instance weighting (attrib.instance_weighting, an ablation; off by default, as
   published): `inverse_loss` weights each instance of either mean by w_i = (1 / L_i) / mean_k(1 / L_k), the
   inverse of its own (detached) loss normalised to mean 1 within its half, so each instance contributes the
   relative change of its loss, grad L_i / L_i = grad log L_i, as the ratio score measures it; without it the
   instances at high noise levels, whose EDM-weighted losses are largest, dominate the update.
2. Score every training item j on one fixed set of M noises (levels on the top t_sched_infer part of the
   sampler's ladder), the same for both models:  s_j = mean_m (L_unl - L_orig) / (L_unl + L_orig + eps).
   L_orig is computed once per job and cached.
"""
import copy
import fnmatch
import time
import warnings

import torch
from torch.func import functional_call

from mucs import config as C
from mucs.attrib.base import Method, register
from mucs.attrib.common import job_cache
from mucs.config import sections
from mucs.diffusion import fixed_noise_generator, ladder_at, per_sample_loss
from mucs.errors import UserError
from mucs.io import digest
from mucs.model import build_denoiser, labels_of
from mucs.train import make_augment, step_generator


def item_noise_losses(D, X, labels, sigmas, E, batch, loss=None):
    """L[j, m] = per-sample loss of item X[j] under noise (sigmas[m], E[m]). The n * M (item, noise) pairs are
    taken item-major in fused batches of `batch` pairs, so every forward pass is large whatever M is.
    `loss(y, sigma, eps, labels)` replaces per_sample_loss(D, ...) (e.g. a `LossEvaluator.bind(D)`)."""
    n, M = len(X), len(sigmas)
    loss = loss or (lambda *a: per_sample_loss(D, *a))
    out = torch.empty(n * M, device=X.device)
    with torch.inference_mode():
        for p in range(0, n * M, int(batch)):
            k = torch.arange(p, min(p + int(batch), n * M), device=X.device)
            j, m = k // M, k % M
            out[p: p + len(k)] = loss(X[j], sigmas[m], E[m], None if labels is None else labels[j]).float()
    return out.view(n, M).cpu()


def pairs_per_batch(eval_batch, X):
    """attrib.eval_batch, or for "auto" a number of input values per forward pass: on CPU 2^14 (256 pairs at 8x8,
    5 at 32x32 RGB), so the activations stay in cache (scripts/bench.py measured 1.5x the rate of 4,096 pairs at
    8x8); on CUDA 2^18 (4,096 and 85), enough work per kernel launch within a paper-sized model's memory."""
    if eval_batch == "auto":
        return max(1, (2 ** 18 if X.is_cuda else 2 ** 14) // X[0].numel())
    if not str(eval_batch).isdigit() or int(eval_batch) < 1:
        raise UserError(f"attrib.eval_batch must be a positive number of (item, noise) pairs or auto, not {eval_batch!r}")
    return int(eval_batch)


class LossEvaluator:
    """per_sample_loss for any copy of one denoiser, with the evaluation switches of attrib: `compile` traces it
    once with the parameters as graph inputs, so the pre model and every unlearned copy share one graph (a
    short last batch is padded to the traced size instead of recompiling); on CUDA, `eval_autocast` (bf16 |
    fp16) and `channels_last`. With none of them it is per_sample_loss itself."""

    def __init__(self, D, cfg, device):
        cuda = torch.device(device).type == "cuda"
        amp, self.channels_last = cfg.get("eval_autocast", "none"), bool(cfg.get("channels_last", False))
        if not cuda and (amp != "none" or self.channels_last):
            warnings.warn("attrib.eval_autocast and attrib.channels_last act on CUDA only; ignored on this device")
            amp, self.channels_last = "none", False
        if amp not in ("none", "bf16", "fp16"):
            raise UserError(f"attrib.eval_autocast must be none, bf16 or fp16, not {amp!r}")
        self.amp = None if amp == "none" else (torch.bfloat16 if amp == "bf16" else torch.float16)
        self.device_type = torch.device(device).type
        self.compiled, self.size = None, None
        if cfg.get("compile", False):
            # a weightless copy to trace: every evaluated model's weights are then inputs alike (tracing D itself
            # would specialise the graph to D's own tensors and recompile for the first unlearned copy)
            self.template = copy.deepcopy(D).to("meta")
            self.compiled = torch.compile(self._loss, dynamic=False)

    def _loss(self, state, y, sigma, eps, labels):
        return per_sample_loss(WithWeights(self.template, state), y, sigma, eps, labels)

    def bind(self, D):
        """loss(y, sigma, eps, labels) of the denoiser D (a copy of the template with other weights)."""
        if self.channels_last:
            D = D.to(memory_format=torch.channels_last)
        state = {**dict(D.named_parameters()), **dict(D.named_buffers())}

        def loss(y, sigma, eps, labels):
            if self.channels_last:
                y, eps = y.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device_type, dtype=self.amp, enabled=self.amp is not None):
                if self.compiled is None:
                    return per_sample_loss(D, y, sigma, eps, labels).float()
                b = len(y)
                self.size = self.size or b
                if b < self.size:  # pad to the traced batch size: one graph for every batch
                    pad = torch.full((self.size - b,), b - 1, device=y.device)
                    y, sigma, eps, labels = (None if v is None else torch.cat([v, v[pad]]) for v in (y, sigma, eps, labels))
                return self.compiled(state, y, sigma, eps, labels)[:b].float()
        return loss


class WithWeights:
    """The denoiser D called with other weights (torch.func.functional_call), so a trace sees them as inputs."""

    def __init__(self, D, state):
        self.D, self.state = D, state

    def __call__(self, *args):
        return functional_call(self.D, self.state, args)

    def loss_weight(self, sigma):
        return self.D.loss_weight(sigma)


def instance_weights(L):
    """w_i = (1 / L_i) / mean_k(1 / L_k): detached inverse losses of mean 1 (instance_weighting=inverse_loss)."""
    inv = 1 / L.detach().float().clamp_min(1e-12)
    return inv / inv.mean()


def trainable_names(D, patterns):
    names = [n for n, _ in D.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise UserError(f"no parameter matches the MUCS trainable patterns {list(patterns)}; "
                        f"set attrib.trainable for this network")
    return names


@register("mucs")
class MUCS(Method):
    shares_work = True

    def prepare(self):
        if hasattr(self, "L_orig"):
            return
        ctx, cfg, dev = self.ctx, self.cfg, self.ctx.device
        patterns = cfg.trainable.get(ctx.cfg.model.net) if hasattr(cfg.trainable, "get") else cfg.trainable
        self.trainable = trainable_names(ctx.D, patterns or [])  # before any work: a bad pattern is refused at once
        self.X = ctx.train.float_images().to(dev)
        self.labels = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        self.labels = None if self.labels is None else self.labels.to(dev)
        self.sigmas, self.E = self.fixed_noise(cfg.noise_seed)
        self.evaluator = LossEvaluator(ctx.D, cfg, dev)
        self.eval_batch = pairs_per_batch(cfg.eval_batch, self.X)
        ev = self.evaluator  # L_orig and every L_unl go through the same evaluation path
        self.L_orig = job_cache(ctx, "mucs-L_orig", dict(noise=digest(self.sigmas, self.E), eval=dict(
            amp=str(ev.amp), compile=ev.compiled is not None, channels_last=ev.channels_last)),
            lambda: self.losses(ctx.D, self.sigmas, self.E))
        null = dict(model=sections(ctx.cfg, "model"), B=cfg.num_noises, batches=cfg.null_batches, seed=ctx.seed)
        self.L_null = float(cfg.L_null) if cfg.L_null != "auto" else float(
            job_cache(ctx, "mucs-L_null", null, self.estimate_L_null, model=False))
        self.augment = make_augment(ctx.cfg.model, ctx.cfg.train) if cfg.augment else None

    # -- the fixed noise set ----------------------------------------------------------------------

    def fixed_noise(self, seed):
        """M noise levels evenly spaced on the top t_sched_infer of the ladder, and M unit noises."""
        cfg, M = self.cfg, int(self.cfg.num_noises)
        u = torch.linspace(0, cfg.t_sched_infer, M, dtype=torch.float64)
        sigmas = ladder_at(u, self.ctx.cfg.sample, self.ctx.D).float()
        E = torch.randn((M,) + tuple(self.X.shape[1:]), generator=fixed_noise_generator(seed, stream=17))
        return sigmas.to(self.ctx.device), E.to(self.ctx.device)

    def estimate_L_null(self):
        """Mean training loss of a freshly initialised model of the same config."""
        ctx, B = self.ctx, int(self.cfg.num_noises)
        torch.manual_seed(ctx.seed + 999)
        D0 = build_denoiser(ctx.cfg.model, ctx.meta).to(ctx.device).eval()
        total = 0.0
        with torch.inference_mode():
            for b in range(int(self.cfg.null_batches)):
                g = step_generator(ctx.seed, b, stream=7)
                idx = torch.randint(len(self.X), (B,), generator=g)
                sigma, eps = D0.train_sigma(B, generator=g), torch.randn((B,) + tuple(self.X.shape[1:]), generator=g)
                lab = None if self.labels is None else self.labels[idx]
                total += per_sample_loss(D0, self.X[idx], sigma.to(ctx.device), eps.to(ctx.device), lab).mean().item()
        return total / int(self.cfg.null_batches)

    def losses(self, D, sigmas, E):
        """L[j, m] of denoiser D over the training set under the noises (sigmas, E)."""
        return item_noise_losses(D, self.X, self.labels, sigmas, E, self.eval_batch, self.evaluator.bind(D))

    # -- step 1: mirrored, bounded unlearning -----------------------------------------------------

    def unlearn(self, x_g, y_g, t):
        ctx, cfg, dev, B = self.ctx, self.cfg, self.ctx.device, int(self.cfg.num_noises)
        D = copy.deepcopy(ctx.D).eval()  # eval mode: no dropout
        params = dict(D.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in self.trainable)
        opt = torch.optim.AdamW([params[n] for n in self.trainable], lr=ctx.cfg.train.lr / cfg.lr_factor,
                                weight_decay=cfg.weight_decay)
        goal = (1 - cfg.tolerance) * self.L_null
        cap = int(cfg.max_steps) if cfg.max_steps is not None else int(cfg.safety_steps)
        step, reason, L_ret, L_gen = 0, None, float("nan"), float("nan")
        while True:
            g = step_generator(ctx.seed * 1000 + 7, int(t) * 100003 + step, stream=3)
            idx = torch.randint(len(self.X), (B,), generator=g)
            y = torch.cat([self.X[idx], x_g.expand(B, -1, -1, -1)])
            aug = None
            if self.augment is not None:
                y_r, aug_r = self.augment(y[:B].cpu(), generator=g)
                y = torch.cat([y_r.to(dev), y[B:]])
                aug = torch.cat([aug_r, torch.zeros_like(aug_r)]).to(dev)
            lab = None
            if self.labels is not None:
                lab = torch.cat([self.labels[idx], (y_g if y_g is not None else torch.zeros_like(self.labels[:1])).expand(B, -1)])
            sigma = D.train_sigma(2 * B, generator=g).to(dev)  # independent noise for the two halves
            eps = torch.randn(y.shape, generator=g).to(dev)
            with ctx.autocast():  # precision.autocast, as in training; the scores stay float32
                L = per_sample_loss(D, y, sigma, eps, lab, aug)
            L_r, L_g = L[:B], L[B:].clamp(max=self.L_null)
            l_ret, l_gen = L_r.mean(), L_g.mean()
            L_ret, L_gen = l_ret.item(), l_gen.item()
            if not (torch.isfinite(l_ret) and torch.isfinite(l_gen)):
                raise UserError(f"MUCS unlearning loss became non-finite at step {step} of target {t}; lower the "
                                f"unlearning lr (attrib.lr_factor) or set attrib.max_steps")
            if L_gen >= goal:
                reason = "reached (1 - tolerance) * L_null"
                break
            if step >= cap:
                reason = "max_steps" if cfg.max_steps is not None else "safety_steps"
                break
            opt.zero_grad(set_to_none=True)
            if cfg.instance_weighting == "inverse_loss":
                l_ret, l_gen = (instance_weights(L_r) * L_r).mean(), (instance_weights(L_g) * L_g).mean()
            (l_ret - cfg.lam * l_gen).backward()
            opt.step()
            step += 1
        D.requires_grad_(False)
        return D, dict(stop=reason, steps=step, L_retain=round(L_ret, 5), L_gen=round(L_gen, 5),
                       L_null=round(self.L_null, 5))

    # -- step 2: noise-consistent skew --------------------------------------------------------------

    def skew_terms(self, L_unl, L_orig):
        """The score's term per noise; the score is their mean over the fixed noises."""
        if self.cfg.score == "diff":
            return L_unl - L_orig
        if self.cfg.score != "ratio":
            raise UserError(f"attrib.score must be 'ratio' or 'diff', not {self.cfg.score!r}")
        return (L_unl - L_orig) / (L_unl + L_orig + self.cfg.eps)

    def skew(self, L_unl, L_orig):
        return self.skew_terms(L_unl, L_orig).mean(1)

    def adaptive_skew(self, D_u, sigmas, E):
        """The scores by successive pruning (attrib.adaptive): every item is evaluated on the first block of the
        fixed noises (blocks are strided, so each spans the whole ladder); after each block the items whose upper
        confidence bound (Student t at level 1 - adaptive_alpha on the terms seen, finite-population corrected;
        with adaptive_prior_dof > 0 each item's variance is moderated towards the items' median with that many
        degrees of freedom) lies below the k-th largest lower bound are dropped, k = num_removal; once at most adaptive_keep * k
        remain, they get every remaining noise, so their scores are the exact run's. A dropped item keeps the
        mean of the terms it saw, capped below the lowest candidate's score (the top k are the candidates).
        Returns (scores [n], noises evaluated per item [n], items evaluated on each pass)."""
        from scipy.stats import t as student

        cfg, n, M = self.cfg, len(self.X), len(sigmas)
        nb = max(1, min(int(cfg.adaptive_blocks), M))
        blocks = [torch.arange(b, M, nb) for b in range(nb)]
        k = min(C.num_removal(self.ctx.cfg), n)
        keep = max(k, int(float(cfg.adaptive_keep) * k))
        total, sq = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        seen, alive, evaluated = torch.zeros(n, dtype=torch.long), torch.arange(n), []
        loss = self.evaluator.bind(D_u)
        for b in range(nb):
            evaluated.append(len(alive))
            last = len(alive) <= keep or b == nb - 1
            m = torch.cat(blocks[b:]) if last else blocks[b]
            lab = None if self.labels is None else self.labels[alive.to(self.labels.device)]
            L = item_noise_losses(D_u, self.X[alive.to(self.X.device)], lab, sigmas[m.to(sigmas.device)],
                                  E[m.to(E.device)], self.eval_batch, loss)
            r = self.skew_terms(L.double(), self.L_orig[alive][:, m].double())
            total[alive] += r.sum(1)
            sq[alive] += r.square().sum(1)
            seen[alive] += len(m)
            if last:
                break
            s, d0 = int(seen[alive[0]]), float(cfg.get("adaptive_prior_dof", 0))
            mean = total[alive] / s
            var = (sq[alive] / s - mean.square()).clamp_min(0) * s / max(s - 1, 1)
            if d0 > 0:  # moderated variance: each item's spread shrunk towards the items' median, d0 extra dof
                var = ((s - 1) * var + d0 * var.median()) / (s - 1 + d0)
            half = student.ppf(1 - float(cfg.adaptive_alpha), max(s - 1, 1) + d0) * (var / s * (1 - s / M)).sqrt()
            cut = (mean - half).topk(k).values[-1]
            alive = alive[mean + half >= cut]
        scores = total / seen
        final = seen == M
        floor = scores[final].min()
        scores[~final] = torch.minimum(scores[~final], floor - 1e-9 * (1 + floor.abs()))
        return scores.float(), seen, evaluated

    def score(self, x, labels, index):
        scores, infos = [], []
        for k, t in enumerate(index.tolist()):
            y_g = None if labels is None else labels[k: k + 1].to(self.ctx.device)
            t0 = time.time()
            D_u, info = self.unlearn(x[k: k + 1].to(self.ctx.device), y_g, t)
            t1 = time.time()
            sigmas, E = (self.sigmas, self.E) if self.cfg.consistent_noise else self.fixed_noise(
                self.cfg.noise_seed + 1 + self.ctx.seed * 100003 + t)
            if self.cfg.get("adaptive", False):
                if not self.cfg.consistent_noise:
                    raise UserError("attrib.adaptive=true needs attrib.consistent_noise=true (it reuses L_orig per noise)")
                s, seen, evaluated = self.adaptive_skew(D_u, sigmas, E)
                info["evaluated"] = evaluated  # items on each pass (the last pass: every remaining noise)
            else:
                s = self.skew(self.losses(D_u, sigmas, E), self.L_orig)
                seen = torch.full((len(s),), len(sigmas), dtype=torch.long)
            scores.append(s)
            infos.append(dict(info, unlearn_s=round(t1 - t0, 3), eval_s=round(time.time() - t1, 3),
                              forward_passes=int(seen.sum()), tensors=dict(noises=seen)))
        return torch.stack(scores), infos
