"""The EDM/VP layer against its formulas, and the sampler's determinism."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from mucs.diffusion import (EDMPrecond, VPPrecond, edm_sigma, heun_sampler, ladder_at, per_sample_loss,
                            sigma_ladder, SeedGenerators)


class Recorder(torch.nn.Module):
    """F returns a fixed function of its inputs and records what it was called with."""

    def forward(self, x, c_noise, labels=None, aug=None):
        self.x, self.c_noise = x, c_noise
        return torch.sin(x) + c_noise.reshape(-1, 1, 1, 1)


def test_edm_preconditioning_matches_table_1():
    sd, F = 0.5, Recorder()
    D = EDMPrecond(F, sigma_data=sd)
    x = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 80.0])
    out = D(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / math.sqrt(s ** 2 + sd ** 2)
        c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
        c_noise = math.log(s) / 4
        assert torch.allclose(F.x[i], c_in * x[i], atol=1e-6)
        assert F.c_noise[i].item() == pytest.approx(c_noise, abs=1e-6)
        expect = c_skip * x[i] + c_out * (torch.sin(c_in * x[i]) + c_noise)
        assert torch.allclose(out[i], expect, atol=1e-5)


def test_edm_loss_is_weighted_mse_per_sample():
    D = EDMPrecond(Recorder(), sigma_data=0.5)
    y, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    L = per_sample_loss(D, y, sigma, eps)
    assert L.shape == (4,)
    for i, s in enumerate(sigma.tolist()):
        w = (s ** 2 + 0.25) / (s * 0.5) ** 2
        d = D(y[i: i + 1] + s * eps[i: i + 1], sigma[i: i + 1])
        assert L[i].item() == pytest.approx(w * (d - y[i: i + 1]).square().mean().item(), rel=1e-5)
    # the loss depends on the injected noise: same noise, same loss; other noise, other loss
    assert torch.equal(L, per_sample_loss(D, y, sigma, eps))
    assert not torch.allclose(L, per_sample_loss(D, y, sigma, -eps))


def test_vp_sigma_inverse_and_range():
    D = VPPrecond(Recorder())
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(D.sigma_inv(D.sigma(t)), t, atol=1e-7)
    assert D.sigma_min == pytest.approx(float(D.sigma(torch.tensor(1e-5))))
    x = torch.randn(2, 1, 4, 4)
    out = D(x, torch.tensor([0.5, 2.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(D.loss_weight(torch.tensor(2.0)), torch.tensor(0.25))


def test_sigma_ladder_edm_formula():
    s = sigma_ladder(5, 0.002, 80.0, 7.0)
    assert len(s) == 6 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[4].item() == pytest.approx(0.002)
    assert s[2].item() == pytest.approx(((80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7))
    cfg = OmegaConf.create(dict(discretization="edm", sigma_min=0.002, sigma_max=80.0, rho=7.0))
    # MUCS's fixed levels: the top 70% of the ladder runs from 80 down to about 0.3
    assert float(ladder_at(0.7, cfg, EDMPrecond(Recorder()))) == pytest.approx(0.318, abs=0.01)
    assert torch.allclose(edm_sigma(torch.tensor([0.0, 1.0])), torch.tensor([80.0, 0.002], dtype=torch.float64))


class Shrink(torch.nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, c_noise, labels=None, aug=None):
        return self.a * x


def test_sampler_is_deterministic_per_seed_and_model_independent_noise():
    seeds = [3, 7, 11]
    D1, D2 = EDMPrecond(Shrink(0.3)), EDMPrecond(Shrink(-0.2))
    sig = sigma_ladder(6)
    lat = SeedGenerators(seeds).randn((1, 4, 4))
    a = heun_sampler(D1, lat, sig)
    b = heun_sampler(D1, SeedGenerators(seeds).randn((1, 4, 4)), sig)
    assert torch.equal(a, b)  # same seeds: same images
    # sample i depends on its own seed only, not on the batch it is in
    alone = heun_sampler(D1, SeedGenerators([7]).randn((1, 4, 4)), sig)
    assert torch.allclose(alone[0], a[1], atol=1e-6)
    # another model starts from the very same initial noise
    assert torch.equal(SeedGenerators(seeds).randn((1, 4, 4)), lat)
    c = heun_sampler(D2, lat, sig)
    assert not torch.allclose(a, c)
    # churn makes it stochastic through the supplied generators only
    g1, g2 = SeedGenerators(seeds), SeedGenerators(seeds)
    s1 = heun_sampler(D1, lat, sig, S_churn=10, randn=g1.randn)
    s2 = heun_sampler(D1, lat, sig, S_churn=10, randn=g2.randn)
    assert torch.equal(s1, s2) and not torch.allclose(s1, a)


def test_heun_is_exact_for_linear_denoiser_better_than_euler():
    """For data N(0, s_d^2) the ideal denoiser is D(x) = s_d^2 / (s_d^2 + sigma^2) x and the ODE maps
    x_T ~ N(0, sigma_max^2) to x_T * s_d / sqrt(s_d^2 + sigma_max^2). Heun must be far closer than Euler."""
    sd = 0.5

    class Ideal(torch.nn.Module):
        loss_weight = None

        def forward(self, x, sigma, labels=None, aug=None):
            s = sigma.reshape(-1, 1, 1, 1)
            return sd ** 2 / (sd ** 2 + s ** 2) * x

    lat = torch.randn(16, 1, 2, 2)
    sig = sigma_ladder(32, 0.002, 80.0)
    exact = lat * 80.0 * sd / math.sqrt(sd ** 2 + 80.0 ** 2)
    heun = heun_sampler(Ideal(), lat, sig)
    euler = heun_sampler(Ideal(), lat, sig, solver="euler")
    err_h, err_e = ((x - exact).abs().max() / exact.abs().max() for x in (heun, euler))
    print(err_h, err_e)
    assert err_h < 0.02 and err_h < err_e / 5
