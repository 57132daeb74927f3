"""`abu`: attribution by unlearning the synthesized image (Wang et al. 2024), the predecessor of MUCS.

As in the released code (PeterWang512/AttributeByUnlearning, `compute_fisher.py`, `compute_influence.py`):
1. The diagonal Fisher F of the training loss: the mean over training items (a random noise level and noise
   each, `fisher_epochs` passes) of the squared per-sample gradients; once per job, cached.
2. From a copy of the pre model, `steps` Fisher-preconditioned ascent steps on the target's loss (the Newton
   step of an elastic-weight-consolidation objective: push L(x_g) up while staying close in the Fisher
   metric):  theta <- theta + lr * g / (N F + damping * mean F),  g the target's loss gradient averaged over
   `grad_samples` training-distribution noise draws, N the training-set size. The published step has no
   damping; a small one keeps parameters the training set never moved from exploding.
3. score_j = mean_m L_unl(j, m) - L_orig(j, m) on one fixed noise set (the pre losses cached per job).
"""
import copy

import torch
from tqdm import tqdm

from mucs.attrib.base import Method, register
from mucs.attrib.common import flat_grads, job_cache, ladder_noise, param_names
from mucs.attrib.mucs import item_noise_losses
from mucs.diffusion import per_sample_loss
from mucs.errors import UserError
from mucs.io import digest
from mucs.model import labels_of
from mucs.train import step_generator


@register("abu")
class ABU(Method):
    shares_work = True

    def prepare(self):
        if hasattr(self, "F"):
            return
        ctx, cfg = self.ctx, self.cfg
        self.X = ctx.train.float_images().to(ctx.device)
        self.labels = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        self.labels = None if self.labels is None else self.labels.to(ctx.device)
        self.names = param_names(ctx.D, list(cfg.params), "abu")
        self.sigmas, self.E = ladder_noise(ctx, cfg.num_noises, cfg.t_range, cfg.noise_seed, self.X.shape[1:])
        self.L_orig = job_cache(ctx, "abu-L_orig", dict(noise=digest(self.sigmas, self.E)), lambda: item_noise_losses(
            ctx.D, self.X, self.labels, self.sigmas, self.E, int(cfg.eval_batch)))
        self.F = job_cache(ctx, "abu-fisher", dict(params=self.names, epochs=cfg.fisher_epochs, job_seed=ctx.seed),
                           self.fisher).to(ctx.device)

    def fisher(self):
        """diag F = E_j[(grad_theta L(x_j; sigma, eps))^2], sigma ~ the training distribution."""
        ctx, n, b = self.ctx, len(self.X), int(self.cfg.grad_batch)
        total = 0
        steps = [(e, i) for e in range(int(self.cfg.fisher_epochs)) for i in range(0, n, b)]
        for e, i in tqdm(steps, desc="abu Fisher", leave=False):
            g = step_generator(ctx.seed, e * n + i, stream=11)
            x = self.X[i: i + b]
            sigma, eps = ctx.D.train_sigma(len(x), generator=g), torch.randn(x.shape, generator=g)
            y = None if self.labels is None else self.labels[i: i + b]
            total = total + flat_grads(ctx.D, self.names, "loss", x, sigma.to(x), eps.to(x), y).square().sum(0).cpu()
        return total / (n * int(self.cfg.fisher_epochs))

    def unlearn(self, x_g, y_g, t):
        ctx, cfg, dev = self.ctx, self.cfg, self.ctx.device
        D = copy.deepcopy(ctx.D).eval()
        params = dict(D.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in self.names)
        precond = len(self.X) * self.F + float(cfg.damping) * self.F.mean()
        S, b = int(cfg.grad_samples), int(cfg.grad_batch)
        for step in range(int(cfg.steps)):
            D.zero_grad(set_to_none=True)
            for i in range(0, S, b):
                g = step_generator(ctx.seed * 1000 + 13, int(t) * 100003 + step * S + i, stream=5)
                m = min(b, S - i)
                sigma = D.train_sigma(m, generator=g).to(dev)
                eps = torch.randn((m,) + tuple(x_g.shape[1:]), generator=g).to(dev)
                y = None if y_g is None else y_g.expand(m, -1)
                (per_sample_loss(D, x_g.expand(m, -1, -1, -1), sigma, eps, y).sum() / S).backward()
            with torch.no_grad():
                flat = torch.cat([params[n].grad.flatten() for n in self.names])
                update = float(cfg.lr) * flat / precond  # ascent: the target's loss goes up
                if not torch.isfinite(update).all():
                    raise UserError(f"abu's unlearning step is not finite for target {t}; raise attrib.damping")
                o = 0
                for n in self.names:
                    k = params[n].numel()
                    params[n].add_(update[o: o + k].view_as(params[n]))
                    o += k
        D.requires_grad_(False)
        return D, dict(steps=int(cfg.steps), grad_norm=round(float(flat.norm()), 6))

    def score(self, x, labels, index):
        scores, infos = [], []
        for k, t in enumerate(index.tolist()):
            y_g = None if labels is None or self.labels is None else labels[k: k + 1].to(self.ctx.device)
            D_u, info = self.unlearn(x[k: k + 1].to(self.ctx.device), y_g, t)
            L_unl = item_noise_losses(D_u, self.X, self.labels, self.sigmas, self.E, int(self.cfg.eval_batch))
            scores.append((L_unl - self.L_orig).mean(1))
            infos.append(info)
        return torch.stack(scores), infos
