"""Pieces shared by the baseline attribution methods: a per-job cache in the pre run folder, fixed noise on
the sampler's ladder, image-embedding similarity (clip, dino, sscd), and per-sample gradients of a scalar
output function of the denoiser (dtrak, das, abu) with a seeded random projection (TRAK).
"""
import contextlib
import warnings
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from mucs.attrib.base import Method
from mucs.diffusion import fixed_noise_generator, ladder_at
from mucs.errors import UserError
from mucs.io import digest, file_hash, load_tensors, save_tensors

# ---------------------------------------------------------------------------------------------
# per-job cache and fixed noise


def pre_weights(ctx):
    return Path(ctx.shared_dir) / ("model-last.safetensors" if ctx.cfg.use_last_ckpt else "model-best.safetensors")


def job_cache(ctx, what, key, compute, model=True):
    """A per-job tensor cached in the pre run folder's attrib-cache/ (shared by every method and process), reused
    only under the same key: the training items (ctx.data_digest), the numerics it is computed under (device type,
    dtype, mixed precision, TF32: ctx.numerics), the pre weights (if `model`) and `key`, the rest of what its
    numbers depend on (a fixed noise set as the digest of its tensors, ...)."""
    full = dict(what=what, data=ctx.data_digest(), numerics=ctx.numerics(), **key)
    if model:
        full["weights"] = file_hash(pre_weights(ctx))
    h = digest(full)
    ctx.uses(what, h)
    path = Path(ctx.shared_dir) / "attrib-cache" / f"{what}-{h}.safetensors"
    if path.exists():
        return load_tensors(path, what=f"{what} cache", hint="delete it to recompute")["value"]
    print(f"[cache] computing {what} for {Path(ctx.shared_dir).name} ({path.name})", flush=True)
    value = torch.as_tensor(compute()).contiguous()
    save_tensors(path, dict(value=value), metadata=dict(key=full))
    return value


def ladder_noise(ctx, M, t_range, seed, shape):
    """M noise levels evenly spaced on the part t_range = [u_lo, u_hi] of the sampler's ladder (u = 0 is the
    highest level) and M unit noises: one fixed set, the same for every training item and target."""
    u = torch.linspace(float(t_range[0]), float(t_range[1]), int(M), dtype=torch.float64)
    sigmas = ladder_at(u, ctx.cfg.sample, ctx.D).float()
    E = torch.randn((int(M),) + tuple(shape), generator=fixed_noise_generator(seed, stream=23))
    return sigmas.to(ctx.device), E.to(ctx.device)


# ---------------------------------------------------------------------------------------------
# image-embedding similarity


class EmbeddingSimilarity(Method):
    """Cosine similarity of offline pretrained image embeddings (the networks of the eval metrics)."""

    embedder = None  # name for mucs.pretrained.load_embedder
    batch_targets = 64
    shares_work = True

    def prepare(self):
        if hasattr(self, "E_train"):
            return
        from mucs.pretrained import load_embedder
        self.net = load_embedder(self.embedder, self.ctx.cfg.paths.cache).to(self.ctx.device)
        compute = lambda: self.embed(self.ctx.train.float_images(), desc=f"{self.name} train")  # noqa: E731
        self.E_train = job_cache(self.ctx, f"embed-{self.embedder}", dict(net=digest(*self.net.state_dict().values())),
                                 compute, model=False)

    @torch.no_grad()
    def embed(self, x, desc=None):
        b = int(self.cfg.batch)
        out = [self.net(x[i: i + b].to(self.ctx.device)).float().cpu()
               for i in tqdm(range(0, len(x), b), desc=desc, disable=desc is None, leave=False)]
        return torch.cat(out)

    def score(self, x, labels, index):
        return self.embed(x) @ self.E_train.T


# ---------------------------------------------------------------------------------------------
# per-sample gradients of an output function, and their random projection


def param_names(D, patterns, what):
    import fnmatch
    names = [n for n, _ in D.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise UserError(f"no parameter matches the {what} patterns {list(patterns)}; "
                        f"set attrib.params for this network")
    return names


def output(kind, D, Dfn, x, sigma, eps, labels):
    """The scalar f(theta; x, sigma, eps) whose gradient is a sample's feature. eps_hat = (x_n - D(x_n)) / sigma is
    the noise prediction implied by the denoiser, so D-TRAK's choices on eps_theta carry over unchanged."""
    s = sigma.reshape(-1, 1, 1, 1)
    x_n = x + s * eps
    d = Dfn(x_n, sigma, labels)
    if kind == "loss":  # the EDM-weighted training loss (per_sample_loss)
        return (D.loss_weight(sigma) * (d - x).square().flatten(1).mean(1)).sum()
    if kind == "square_D":
        return d.square().mean()
    eps_hat = (x_n - d) / s
    if kind == "square":  # D-TRAK's best: ||eps_theta||^2 averaged over pixels
        return eps_hat.square().mean()
    if kind == "l1":
        return eps_hat.abs().mean()
    if kind == "l2":
        return eps_hat.flatten().norm()
    if kind == "mean":
        return eps_hat.mean()
    raise UserError(f"unknown output function {kind!r}; choose loss, square, square_D, l1, l2 or mean")


def flat_grads(D, names, kind, x, sigma, eps, labels=None):
    """Per-sample gradients [B, p] of output(kind) with respect to the parameters `names` (torch.func)."""
    params = {n: p.detach() for n, p in D.named_parameters()}
    chosen = {n: params.pop(n) for n in names}
    buffers = dict(D.named_buffers())

    def f(theta, x1, s1, e1, y1):
        Dfn = lambda *a: functional_call(D, ({**params, **theta}, buffers), a)  # noqa: E731
        return output(kind, D, Dfn, x1[None], s1[None], e1[None], None if y1 is None else y1[None])

    plain = getattr(D.net, "plain_attention", contextlib.nullcontext)  # diffusers models: no fused attention kernels
    with warnings.catch_warnings(), plain():
        warnings.filterwarnings("ignore", message=".*performance drop.*")  # no vmap rule for CPU attention
        g = vmap(grad(f), in_dims=(None, 0, 0, 0, None if labels is None else 0))(chosen, x, sigma, eps, labels)
    return torch.cat([g[n].flatten(1) for n in names], 1)


PROJ_BLOCK = 1 << 15  # parameters per generated block of P: P is the same for any batch layout


def project(G, k, kind, seed):
    """G [B, p] -> G P / sqrt(k) with P [p, k] Gaussian or Rademacher, generated block by block from the seed on
    G's device (never stored; CPU and CUDA draw different P); 'identity' returns G (k = p)."""
    if kind == "identity":
        return G
    if kind not in ("gaussian", "rademacher"):
        raise UserError(f"unknown projection {kind!r}; choose gaussian, rademacher or identity")
    out = torch.zeros(len(G), int(k), dtype=G.dtype, device=G.device)
    for b, i in enumerate(range(0, G.shape[1], PROJ_BLOCK)):
        gen = torch.Generator(device=G.device).manual_seed(int(seed) * 1_000_003 + b)
        n = min(PROJ_BLOCK, G.shape[1] - i)
        if kind == "gaussian":
            P = torch.randn(n, int(k), generator=gen, device=G.device, dtype=G.dtype)
        else:
            P = torch.randint(0, 2, (n, int(k)), generator=gen, device=G.device).to(G.dtype) * 2 - 1
        out += G[:, i: i + n] @ P
    return out / float(k) ** 0.5
