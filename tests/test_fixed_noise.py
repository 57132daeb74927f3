"""No fixed noise set of any method equals a sample's initial latent: a sample's latent is drawn from its test
id as the seed, and the fixed sets come from a seed range no test id reaches (mucs.diffusion.fixed_noise_generator)."""
from types import SimpleNamespace

import pytest
import torch

from mucs.attrib.common import ladder_noise
from mucs.attrib.ekfac import training_draws
from mucs.attrib.journey_trak import noise as journey_noise
from mucs.attrib.mucs import MUCS
from mucs.config import compose
from mucs.diffusion import SeedGenerators
from mucs.model import build_denoiser

SHAPE = (1, 8, 8)
N_IDS = 10_000


@pytest.fixture(scope="module")
def latents():
    """The unit-noise initial latents of the samples with test ids 0 ... 9,999, as bytes per latent."""
    x = SeedGenerators(range(N_IDS)).randn(SHAPE)
    return {x[i].numpy().tobytes(): i for i in range(N_IDS)}


def collisions(E, latents):
    return [latents[e.numpy().tobytes()] for e in E if e.numpy().tobytes() in latents]


def context(method):
    cfg = compose([f"attrib={method}"])
    D = build_denoiser(cfg.model, dict(cfg.data.expect))
    return cfg, SimpleNamespace(cfg=cfg, D=D, device="cpu")


def fixed_sets():
    """(name, noises [M, *SHAPE]) of every method's fixed noise set at its defaults."""
    cfg, ctx = context("mucs")
    m = MUCS(cfg.attrib, ctx)
    m.X = torch.zeros((1,) + SHAPE)
    yield "mucs", m.fixed_noise(cfg.attrib.noise_seed)[1]
    for t in range(3):  # consistent_noise=false: fresh noise per target
        yield f"mucs fresh {t}", m.fixed_noise(cfg.attrib.noise_seed + 1 + cfg.seed * 100003 + t)[1]
    for method, count in (("dtrak", "num_timesteps"), ("das", "num_timesteps"), ("abu", "num_noises")):
        cfg, ctx = context(method)
        a = cfg.attrib
        yield method, ladder_noise(ctx, a[count], a.t_range, a.noise_seed, SHAPE)[1]
    cfg, ctx = context("ekfac")
    yield "ekfac", training_draws(ctx.D, cfg.attrib.num_draws, cfg.attrib.noise_seed, SHAPE)[1]
    cfg, ctx = context("journey_trak")
    a = cfg.attrib
    yield "journey_trak", torch.cat([journey_noise(a.noise_seed, s, k, a.noises, SHAPE)
                                     for k in range(cfg.sample.num_steps) for s in (0, 1)])
    yield "lds", ladder_noise(ctx, cfg.lds.num_noises, cfg.lds.t_range, cfg.lds.noise_seed, SHAPE)[1]
    sc = cfg.groups.score
    yield "guda/logo", ladder_noise(ctx, sc.num_noises, sc.t_range, sc.noise_seed, SHAPE)[1]


def test_the_check_sees_a_collision(latents):
    """What MUCS drew before (seed noise_seed * 7919 + 17): its first noise was the latent of test id 17."""
    old = torch.randn((4,) + SHAPE, generator=torch.Generator().manual_seed(0 * 7919 + 17))
    assert collisions(old, latents) == [17]


@pytest.mark.parametrize("name, E", [pytest.param(n, E, id=n) for n, E in fixed_sets()])
def test_no_fixed_noise_is_a_sample_latent(name, E, latents):
    assert E.shape[1:] == SHAPE and len(E) > 0
    assert collisions(E, latents) == [], f"{name}'s fixed noise equals sample latents"
