"""`dtrak`: TRAK on the diffusion model's gradients (D-TRAK, Zheng et al. 2023).

A sample's feature is the randomly projected gradient of an output function f, averaged over K fixed noise
levels with fixed noise:  phi(x) = P^T (1/K) sum_k grad_theta f(theta; x, sigma_k, eps_k).
D-TRAK's best f is the squared norm of the noise prediction (`output: square`); the plain loss and the other
published choices are config values. With Phi [n_train, k] the training features (cached once per job),
    tau(x) = phi(x) (Phi^T Phi + lambda I)^{-1} Phi^T       (lambda relative to mean diag(Phi^T Phi); 0: Phi^+).
"""
import torch
from tqdm import tqdm

from mucs.attrib.base import Method, register
from mucs.attrib.common import flat_grads, job_cache, ladder_noise, param_names, project
from mucs.io import digest
from mucs.model import labels_of


def trak_solver(Phi, lam):
    """M [k, n] with tau = phi M: (Phi^T Phi + lam' I)^{-1} Phi^T, lam' = lam * mean diag(Phi^T Phi). Solved in
    whichever of the k x k or n x n forms is smaller (equal by the push-through identity); lam = 0 is the
    limit lam -> 0, the pseudo-inverse Phi^+."""
    Phi = Phi.double()
    n, k = Phi.shape
    if lam == 0:
        return torch.linalg.pinv(Phi)
    lam = float(lam) * Phi.square().sum() / k
    if k <= n:
        return torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(k, dtype=Phi.dtype), Phi.T)
    return Phi.T @ torch.linalg.inv(Phi @ Phi.T + lam * torch.eye(n, dtype=Phi.dtype))


@register("dtrak")
class DTRAK(Method):
    batch_targets = 64
    shares_work = True

    def prepare(self):
        if hasattr(self, "M"):
            return
        ctx, cfg = self.ctx, self.cfg
        self.X = ctx.train.float_images().to(ctx.device)
        self.labels = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        self.labels = None if self.labels is None else self.labels.to(ctx.device)
        self.names = param_names(ctx.D, list(cfg.params), self.name)
        self.sigmas, self.E = ladder_noise(ctx, cfg.num_timesteps, cfg.t_range, cfg.noise_seed, self.X.shape[1:])
        key = dict(output=cfg.output, noise=digest(self.sigmas, self.E), params=self.names, proj=cfg.proj,
                   k=cfg.proj_dim, proj_seed=cfg.proj_seed)
        self.Phi = job_cache(ctx, f"{self.name}-features", key,
                             lambda: self.features(self.X, self.labels, self.sigmas, self.E, f"{self.name} train features"))
        self.M = trak_solver(self.Phi, float(cfg.lam)).float()

    def features(self, X, labels, sigmas, E, desc=None):
        """phi(x) for every row of X: [n, k], the gradient averaged over the K pairs (sigmas[k], E[k]); E [K, ...] is
        the same for every row, or [n, K, ...] a row's own."""
        cfg, D, K = self.cfg, self.ctx.D, len(sigmas)
        own = E.dim() == X.dim() + 1
        per = max(1, int(cfg.grad_batch) // K)  # items per vmap call (K pairs each)
        out, bar = [], tqdm(total=len(X), desc=desc, disable=desc is None, leave=False)
        for i in range(0, len(X), int(cfg.proj_batch)):
            Xi = X[i: i + int(cfg.proj_batch)]
            yi = None if labels is None else labels[i: i + len(Xi)]
            G = []
            for j in range(0, len(Xi), per):
                x, b = Xi[j: j + per], len(Xi[j: j + per])
                y = None if yi is None else yi[j: j + b].repeat_interleave(K, 0)
                eps = E[i + j: i + j + b].flatten(0, 1) if own else E.repeat(b, 1, 1, 1)
                g = flat_grads(D, self.names, cfg.output, x.repeat_interleave(K, 0), sigmas.repeat(b), eps, y)
                G.append(g.view(b, K, -1).mean(1))
                bar.update(b)
            out.append(project(torch.cat(G), cfg.proj_dim, cfg.proj, cfg.proj_seed).cpu())
        bar.close()
        return torch.cat(out)

    def score(self, x, labels, index):
        dev = self.ctx.device
        phi = self.features(x.to(dev), None if labels is None or self.labels is None else labels.to(dev), self.sigmas, self.E)
        return phi @ self.M
