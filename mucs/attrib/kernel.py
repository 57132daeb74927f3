"""`kernel`: training-free attribution from the kernel mean-shift view of diffusion (and drifting) models.

At noise level sigma the optimal denoiser of the training set {x_j} is a posterior mean over the items,
    w_j(x) = softmax_j(-||x - x_j||^2 / (2 sigma^2)),    D*(x; sigma) = sum_j w_j(x) x_j,
and the kernel mean shift  sum_j w_j(x) x_j - x  equals  sigma^2 grad_x log p_sigma(x)  (Tweedie), the score of
the Gaussian-smoothed empirical distribution. The weights say how much each training item pulls x at that
level: a closed-form attribution. The Laplace kernel exp(-||x - x_j|| / tau) (the drifting models' default)
is a variant, with tau = tau_factor * sigma per level. Scores aggregate the levels of the sampler's ladder
(part `t_range`, `num_levels` of them) by the mean of the weights or of the log-weights (the latter ranks as
pixel distance for a single kernel family: use it as a check). With `condition: true` and class conditions,
the posterior runs over the target's class only (the optimal conditional denoiser).
"""
import torch

from mucs.attrib.base import Method, register
from mucs.diffusion import ladder_at
from mucs.errors import UserError
from mucs.model import labels_of

LOG_FLOOR = -1e30  # log-weight of items outside the target's class (finite, so means stay finite)


def log_posterior(x, X, bandwidth, kernel="gaussian", mask=None):
    """log w_j(x) [T, n] for x [T, d], X [n, d] (float64, stable log-softmax); `mask` [T, n] keeps items."""
    d2 = torch.cdist(x.double(), X.double()).square()
    if kernel == "gaussian":
        logits = -d2 / (2 * bandwidth ** 2)
    elif kernel == "laplace":
        logits = -d2.sqrt() / bandwidth
    else:
        raise UserError(f"attrib.kernel must be gaussian or laplace, not {kernel!r}")
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.log_softmax(dim=1)


def mean_shift(x, X, sigma, kernel="gaussian", mask=None):
    """sum_j w_j(x) x_j - x [T, d]: for the Gaussian kernel, sigma^2 grad log p_sigma(x)."""
    w = log_posterior(x, X, sigma, kernel, mask).exp()
    return w @ X.double() - x.double()


@register("kernel")
class Kernel(Method):
    batch_targets = 64

    def prepare(self):
        ctx, cfg = self.ctx, self.cfg
        self.X = ctx.train.float_images().flatten(1).double()
        n = int(cfg.num_levels or ctx.cfg.sample.num_steps)
        u = torch.linspace(float(cfg.t_range[0]), float(cfg.t_range[1]), n, dtype=torch.float64)
        self.sigmas = ladder_at(u, ctx.cfg.sample, ctx.D).tolist()
        Y = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        self.Y = Y if cfg.condition and Y is not None and ctx.meta.get("cond") == "class" else None

    def mask(self, labels):
        """Same-class items, for class-conditional targets; all items where a class has no training item."""
        if self.Y is None or labels is None:
            return None
        m = (labels.float() @ self.Y.T) > 0.5
        m[~m.any(1)] = True
        return m

    def score(self, x, labels, index):
        cfg, x = self.cfg, x.flatten(1).double()
        mask = self.mask(labels)
        total = torch.zeros(len(x), len(self.X), dtype=torch.float64)
        for s in self.sigmas:
            bw = s * float(cfg.tau_factor) if cfg.kernel == "laplace" else s
            logw = log_posterior(x, self.X, bw, cfg.kernel, mask)
            if cfg.aggregate == "mean":
                total += logw.exp()
            elif cfg.aggregate == "logmean":
                total += logw.clamp_min(LOG_FLOOR)
            else:
                raise UserError(f"attrib.aggregate must be mean or logmean, not {cfg.aggregate!r}")
        return total / len(self.sigmas)
