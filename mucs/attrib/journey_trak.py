"""`journey_trak`: TRAK at the steps of the target's own sampling trajectory (journey-TRAK; Georgiev et al. 2023,
"The journey, not the destination: how data guides diffusion models").

A gpre target x_0 is regenerated from its sample seed and condition with the job's sampler, keeping its
trajectory x_{t_0}, ..., x_{t_{N-1}} (levels sigma_0 > ... > sigma_{N-1}). At K steps k, evenly spaced over the N:
  - the step's output: f_k(theta) = (1/R) sum_r f(theta; x0_hat_k, sigma_k, eps_kr) with x0_hat_k = D(x_{t_k},
    sigma_k) the model's estimate of the final image from that point (detached, as the sampler saw it), re-noised
    to the step's level (the released code's scoring output); f is D-TRAK's output function, by default `loss`
    (the denoising loss: journey-TRAK's MSE of the noise prediction, in the model's weighting). `anchor:
    trajectory` evaluates at the trajectory point itself instead, with the final sample as the clean image:
    f(theta; x_0, sigma_k, (x_{t_k} - x_0) / sigma_k), the released code's "trajectory noise" option;
  - the training items' features at the matching level with the same R fixed noises eps_kr (common random
    numbers, as D-TRAK's fixed noise set; the released code draws fresh noise on both sides and averages many
    draws, which a CPU budget cannot), Phi_k[j] = P^T (1/R) sum_r grad f(theta; x_j, sigma_k, eps_kr), with
    D-TRAK's projector and solver: tau_k(x) = phi_k(x) (Phi_k^T Phi_k + lambda I)^{-1} Phi_k^T. Phi_k is cached per
    job and step.
The step scores [K, n] are kept in <run>--post_journey_trak/journey-steps/ (the journey-TRAK view: late steps
attribute the target's details, early ones its coarse shape) and aggregated into one score per item (`aggregate`:
mean over the steps of the per-step z-scores, ranks or raw scores, with the ensemble's normalisation).
User-supplied targets (targets=...) have no trajectory: a forward-noised one, x_{t_k} = x + sigma_k eps with one
fixed eps (noise_seed), stands in for it, and the log says so.
"""
import torch

from mucs.attrib.base import register
from mucs.attrib.common import job_cache, param_names
from mucs.attrib.dtrak import DTRAK, trak_solver
from mucs.attrib.ensemble import normalise
from mucs.diffusion import fixed_noise_generator, guided
from mucs.errors import UserError
from mucs.generate import ladder, load_samples, sample_batch
from mucs.io import digest, save_tensors
from mucs.model import labels_of
from mucs.precision import tf32

STEPS = "journey-steps"


def noise(seed, stream, step, R, shape):
    """R fixed unit noises of one sampler step: stream 0 for every item and target, 1 a user target's path."""
    g = fixed_noise_generator(seed, stream=41 + 2 * int(step) + stream)
    return torch.randn((int(R),) + tuple(shape), generator=g)


@register("journey_trak")
class JourneyTRAK(DTRAK):
    batch_targets = 20  # targets regenerated and scored together
    shares_work = True  # the training features of every attributed step, computed once per job before the shards

    def prepare(self):
        if hasattr(self, "solvers"):
            return
        ctx = self.ctx
        self.X = ctx.train.float_images().to(ctx.device)
        self.labels = labels_of(ctx.train, ctx.cfg.model, ctx.meta)
        self.labels = None if self.labels is None else self.labels.to(ctx.device)
        self.names = param_names(ctx.D, list(self.cfg.params), self.name)
        self.solvers = {}  # sampler step -> its TRAK solver M_k [k, n]
        self.sigmas = self.levels()
        for k in self.steps(len(self.sigmas)):
            self.solver(k, float(self.sigmas[k]))

    def levels(self):
        """The sampler's levels at its steps (those of every trajectory, the same for every seed): from one
        throwaway sample's trace."""
        ctx, trace = self.ctx, []
        y = None if self.labels is None else self.labels[:1]
        with tf32(ctx.cfg.precision.tf32):
            sample_batch(ctx.D, ctx.cfg, ladder(ctx.cfg, ctx.D), [0], y, tuple(self.X.shape[1:]), ctx.device, trace)
        return torch.tensor([s for s, _ in trace], dtype=torch.float64)

    def steps(self, N):
        """The K attributed steps of N, evenly spaced (all of them when attrib.steps is null)."""
        return sorted({round(float(u)) for u in torch.linspace(0, N - 1, min(N, int(self.cfg.steps or N)))})

    def solver(self, step, sigma):
        """M_k of sampler step `step` at level sigma: from the training features there (cached per job)."""
        if step not in self.solvers:
            ctx, cfg = self.ctx, self.cfg
            E = noise(cfg.noise_seed, 0, step, cfg.noises, self.X.shape[1:]).to(ctx.device)
            s = torch.full((int(cfg.noises),), sigma, device=ctx.device)
            key = dict(output=cfg.output, noise=digest(s, E), params=self.names, proj=cfg.proj, k=cfg.proj_dim,
                       proj_seed=cfg.proj_seed)
            Phi = job_cache(ctx, "journey-features", key,
                            lambda: self.features(self.X, self.labels, s, E, f"journey train features, step {step}"))
            self.solvers[step] = trak_solver(Phi, float(cfg.lam)).float()
        return self.solvers[step]

    def trajectories(self, x, labels, index):
        """(states [N, T, ...] of the targets' trajectories, their levels [N], how they were made)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        dev, shape = ctx.device, tuple(x.shape[1:])
        y = None if labels is None else labels.to(dev)
        trace = []
        if cfg.targets:  # no trajectory to regenerate: the sampler's levels, forward noise
            print(f"[{self.name}] user targets: a forward-noised trajectory x + sigma_k eps (fixed eps) stands in for "
                  f"their sampling trajectories")
            sigmas = self.sigmas
            eps = noise(self.cfg.noise_seed, 1, 0, 1, shape).to(dev)
            return x.to(dev)[None] + sigmas.view(-1, 1, 1, 1, 1).to(dev).float() * eps, sigmas, "forward-noised"
        seeds = load_samples(ctx.shared_dir)["seeds"][index].tolist()
        with tf32(cfg.precision.tf32):  # as gpre sampled them (scores run with precision.score_tf32)
            final = sample_batch(ctx.D, cfg, ladder(cfg, ctx.D), seeds, y, shape, dev, trace).clamp(-1, 1).cpu()
        diff = float((final - x.cpu()).abs().max())
        if diff > 1e-2:
            raise UserError(f"the regenerated trajectories of targets {index.tolist()} end {diff:.3g} away from the "
                            f"targets; they were made by other weights or sample settings: redo gpre")
        return torch.stack([s for _, s in trace]), torch.tensor([s for s, _ in trace], dtype=torch.float64), "regenerated"

    def score(self, x, labels, index):
        ctx, cfg, dev = self.ctx, self.cfg, self.ctx.device
        labels = None if labels is None or self.labels is None else labels.to(dev)
        states, sigmas, how = self.trajectories(x, labels, index)
        N, T = len(sigmas), len(x)
        steps = self.steps(N)
        D_g = guided(ctx.D, ctx.cfg.sample.guidance)  # x0_hat as the sampler saw it
        S = []
        for k in steps:
            s = float(sigmas[k])
            if cfg.anchor == "x0_hat":
                with torch.no_grad():
                    x0 = D_g(states[k].to(dev), torch.full((T,), s, device=dev), labels).float()
                E = noise(cfg.noise_seed, 0, k, cfg.noises, x.shape[1:]).to(dev)  # the training items' own
                phi = self.features(x0, labels, torch.full((len(E),), s, device=dev), E)
            else:
                x_0 = x.to(dev)
                phi = self.features(x_0, labels, torch.full((1,), s, device=dev), ((states[k].to(dev) - x_0) / s)[:, None])
            S.append(phi @ self.solver(k, s))
        S = torch.stack(S, 1)  # [T, K, n]
        for i, t in enumerate(index.tolist()):
            save_tensors(ctx.work_dir / STEPS / f"t{t:05d}.safetensors", dict(scores=S[i], sigmas=sigmas[steps].float(),
                                                                            steps=torch.tensor(steps)))
        agg = S if cfg.aggregate == "mean" else torch.stack([normalise(S[:, k], cfg.aggregate) for k in range(len(steps))], 1)
        info = dict(trajectory=how, steps=len(steps), sigma_max=round(float(sigmas[steps[0]]), 4),
                    sigma_min=round(float(sigmas[steps[-1]]), 4))
        return agg.mean(1).float(), [info for _ in range(T)]
