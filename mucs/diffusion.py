"""The diffusion layer: preconditioners (EDM, VP), the per-sample training loss, sigma ladders and the
deterministic Heun sampler. Equation numbers refer to Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models" (EDM), Table 1 and Algorithm 2.

Everything here takes its noise from the caller, so attribution methods can hold the noise fixed.
"""
import math

import numpy as np
import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# Preconditioners: wrap a raw network F into a denoiser D(x, sigma, y).


class EDMPrecond(nn.Module):
    """D(x) = c_skip x + c_out F(c_in x, c_noise) with the EDM scalings (Table 1, right column)."""

    kind = "edm"

    def __init__(self, net, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, P_mean=-1.2, P_std=1.2):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max, self.P_mean, self.P_std = sigma_min, sigma_max, P_mean, P_std

    def forward(self, x, sigma, labels=None, augment_labels=None):
        """D(x, sigma, labels): the denoised estimate [B, C, H, W] of noisy images x [B, C, H, W] at noise levels
        sigma [B], conditioned on `labels` [B, d] (None or zero rows: no condition) and augmentation labels."""
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F = self.net(c_in * x, c_noise, labels, augment_labels)
        return c_skip * x + c_out * F

    def train_sigma(self, n, generator=None):
        """sigma ~ logN(P_mean, P_std^2), the EDM training distribution."""
        return (torch.randn(n, generator=generator) * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Eq. 8 with Table 1)."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class VPPrecond(nn.Module):
    """Variance-preserving preconditioning of Song et al. 2021 in EDM form (Table 1, VP column)."""

    kind = "vp"

    def __init__(self, net, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5):
        super().__init__()
        self.net, self.beta_d, self.beta_min, self.M, self.epsilon_t = net, beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0)))

    def sigma(self, t):
        """sigma(t) of the VP schedule at times t in [epsilon_t, 1] (a number or tensor), as float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(sigma), the inverse of `sigma`, as float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x, sigma, labels=None, augment_labels=None):
        """D(x, sigma, labels): the denoised estimate [B, C, H, W] of noisy images x at noise levels sigma [B], as
        EDMPrecond.forward, with the VP scalings."""
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = ((self.M - 1) * self.sigma_inv(sigma.double())).to(x.dtype).flatten()
        return x + c_out * self.net(c_in * x, c_noise, labels, augment_labels)

    def train_sigma(self, n, generator=None):
        """t ~ U(epsilon_t, 1), sigma = sigma(t)."""
        t = torch.rand(n, generator=generator, dtype=torch.float64) * (1 - self.epsilon_t) + self.epsilon_t
        return self.sigma(t).float()

    def loss_weight(self, sigma):
        """lambda(sigma) = 1 / sigma^2 (Table 1, VP column): the epsilon-prediction error."""
        return 1 / sigma ** 2


PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond}


# ---------------------------------------------------------------------------------------------
# The per-sample loss. Callers supply sigma and unit noise eps to hold them fixed.


def per_sample_loss(D, y, sigma, eps, labels=None, augment_labels=None, target=None):
    """lambda(sigma) * ||D(y + sigma eps, sigma) - y||^2 averaged over pixels: one value per sample [B].
    `target(D_yn)` (given the detached output) replaces y as what the output is compared with, e.g. targets
    sampled from the model for a true Fisher."""
    s = sigma.reshape(-1, 1, 1, 1).to(y.dtype)
    D_yn = D(y + s * eps, sigma, labels, augment_labels)
    t = y if target is None else target(D_yn.detach())
    return D.loss_weight(sigma).to(y.dtype) * (D_yn - t).square().flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Sigma ladders and the sampler.


def edm_sigma(u, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Eq. 5 at continuous position u in [0, 1] (0 -> sigma_max, 1 -> sigma_min)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_ladder(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, discretization="edm", precond=None,
                 epsilon_s=1e-3):
    """The sampler's noise levels sigma_0 > ... > sigma_{N-1} followed by sigma_N = 0 (float64)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    if discretization == "edm":
        s = edm_sigma(i / (num_steps - 1), sigma_min, sigma_max, rho)
    elif discretization == "vp":  # uniform in t from 1 to epsilon_s (Song et al. 2021)
        s = precond.sigma(1 + i / (num_steps - 1) * (epsilon_s - 1))
    else:
        raise ValueError(f"unknown discretization {discretization!r}")
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


class SeedGenerators:
    """One torch.Generator per sample, so sample i depends on its own seed only (not on batch layout)."""

    def __init__(self, seeds):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape, device="cpu"):
        """Unit Gaussian noise [len(seeds), *shape] on `device`, row i drawn from sample i's own generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(device)


FIXED_NOISE = 2 ** 31  # the seed range of fixed noise sets: [2^31, 2^32), above every sample seed (a test id)


def fixed_noise_generator(seed, stream):
    """The generator of a method's fixed noise set. A sample's initial latent comes from its test id as the seed,
    and torch's CPU generator keeps a seed's low 32 bits only: these seeds keep their low 32 bits in
    [2^31, 2^32), which no test id reaches, so no fixed noise equals a sample's latent. `stream` keeps the sets of
    different methods apart."""
    return torch.Generator().manual_seed(FIXED_NOISE + (int(seed) * 7919 + int(stream)) % FIXED_NOISE)


def guided(D, guidance):
    """Classifier-free guidance: D_w = D(x|0) + w (D(x|y) - D(x|0)); the zero label is 'no condition'."""
    if guidance == 1.0:
        return D

    def D_w(x, sigma, labels=None, augment_labels=None):
        if labels is None:
            return D(x, sigma)
        both = D(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([torch.zeros_like(labels), labels]))
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + guidance * (d_cond - d_uncond)

    return D_w


@torch.no_grad()
def heun_sampler(D, latents, sigmas, labels=None, guidance=1.0, S_churn=0.0, S_min=0.0, S_max=float("inf"),
                 S_noise=1.0, randn=None, solver="heun", trace=None):
    """Algorithm 2 of EDM. `latents` is unit noise; `sigmas` a ladder ending in 0; `randn(shape)` supplies
    churn noise (per-sample generators keep results independent of batching). With S_churn = 0 it is
    deterministic: the same latents give the same image for any model. `trace` (a list) receives (sigma, x) at
    every step where the step's first denoiser evaluation is made: the trajectory."""
    D = guided(D, guidance)
    sigmas = sigmas.to(latents.device)
    N = len(sigmas) - 1
    x = latents.double() * sigmas[0]
    one = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for i in range(N):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
        s_hat = s_cur + gamma * s_cur
        if gamma > 0:
            x = x + (s_hat ** 2 - s_cur ** 2).sqrt() * S_noise * randn(x.shape[1:]).to(x)
        if trace is not None:
            trace.append((float(s_hat), x.float()))
        d = (x - D(x.float(), (s_hat * one).float(), labels).double()) / s_hat
        x_next = x + (s_next - s_hat) * d
        if solver == "heun" and i < N - 1:  # second-order correction, skipped at the last step (sigma = 0)
            d2 = (x_next - D(x_next.float(), (s_next * one).float(), labels).double()) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.float()


def describe_ladder(sigmas):
    """A one-line summary of a sigma ladder (ending in 0) for logs: `<steps> steps, sigma <first> -> <last>`."""
    s = np.asarray(sigmas, dtype=float)
    return f"{len(s) - 1} steps, sigma {s[0]:.3g} -> {s[-2]:.3g}"


def ladder_at(u, sample_cfg, precond, epsilon_s=1e-3):
    """The sampler's sigma at continuous ladder position u in [0, 1] (0: the highest noise level)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if sample_cfg.discretization == "vp":
        return precond.sigma(1 + u * (epsilon_s - 1))
    lo = max(sample_cfg.sigma_min, getattr(precond, "sigma_min", 0))
    hi = min(sample_cfg.sigma_max, getattr(precond, "sigma_max", float("inf")))
    return edm_sigma(u, lo, hi, sample_cfg.rho)
