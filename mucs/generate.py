"""Generation for gpre and gpost: every sample is tied to one held-out item, whose id is its noise seed
and whose label/caption is its condition, so pre and post images differ only through the weights."""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mucs.diffusion import SeedGenerators, heun_sampler, sigma_ladder
from mucs.errors import UserError
from mucs.io import atomic_path, load_tensor_metadata, load_tensors, save_tensors
from mucs.model import labels_of
from mucs.precision import autocast, numerics

SAMPLES = "samples.safetensors"


def ladder(cfg, D):
    s = cfg.sample
    if s.get("sampler", "heun") == "diffusers" and getattr(D, "kind", None) != "ddpm":
        raise UserError("sample.sampler=diffusers steps with a diffusers scheduler, which needs a diffusers model "
                        "(model=diffusers_unet, model=diffusers_dit or pretrained=<folder>); use sample.sampler=heun")
    if s.discretization == "vp" and not hasattr(D, "sigma"):
        raise UserError(f"sample.discretization=vp steps through a VP model's sigma(t), but this model's "
                        f"preconditioning is {cfg.model.precond.kind!r}; use sample.discretization=edm")
    lo, hi = max(s.sigma_min, getattr(D, "sigma_min", 0)), min(s.sigma_max, getattr(D, "sigma_max", float("inf")))
    return sigma_ladder(s.num_steps, lo, hi, s.rho, s.discretization, precond=D)


@torch.no_grad()
def sample(D, cfg, seeds, labels, shape, device, desc="sample", parts=None):
    """Images in [-1, 1] for the given per-sample seeds and condition vectors, in batches. With `parts` (a
    folder) each batch is saved there as it is made and read back on a rerun, so a killed run resumes."""
    s, sigmas, out = cfg.sample, ladder(cfg, D), []
    now = numerics(device, cfg.precision.autocast)
    for i in tqdm(range(0, len(seeds), s.batch), desc=desc, unit="batch", leave=False):
        part = parts and Path(parts) / f"b{i // s.batch:05d}.safetensors"
        if part and part.exists():
            x = load_part(part, seeds[i: i + s.batch], shape, now)
            if x is not None:
                out.append(x)
                continue
        y = None if labels is None else labels[i: i + s.batch].to(device)
        out.append(sample_batch(D, cfg, sigmas, seeds[i: i + s.batch], y, shape, device).clamp(-1, 1).cpu())
        if part:
            save_tensors(part, dict(images=out[-1], seeds=torch.tensor(seeds[i: i + s.batch], dtype=torch.long)),
                         metadata=dict(numerics=now))
    return torch.cat(out) if out else torch.empty(0, *shape)


def sample_batch(D, cfg, sigmas, seeds, y, shape, device, trace=None):
    """The samples (unclamped) of one batch of per-sample seeds and conditions y, with the configured sampler;
    `trace` (a list) receives the trajectory's (sigma, x) at every step (see heun_sampler)."""
    s, gens = cfg.sample, SeedGenerators(seeds)
    latents = gens.randn(shape, device)
    with autocast(device, cfg.precision.autocast):  # the ODE state itself stays float64
        if s.get("sampler", "heun") == "diffusers":  # the model's own scheduler; step noise from each sample's seed
            from mucs.diffusers_adapter import make_scheduler, scheduler_sampler
            return scheduler_sampler(D, latents, make_scheduler(D.config, s.get("scheduler")), s.num_steps, y,
                                     guidance=s.guidance, generators=gens.gens, trace=trace)
        return heun_sampler(D, latents, sigmas, y, guidance=s.guidance, S_churn=s.S_churn, S_min=s.S_min,
                            S_max=s.S_max, S_noise=s.S_noise, randn=lambda sh: gens.randn(sh, device),
                            solver=s.solver, trace=trace)


def load_part(path, seeds, shape, now):
    """A finished batch's images, or None when it was made under other numerics than `now` (it is made again)."""
    t = load_tensors(path, what="generation part", hint="rerun the stage")
    if t.get("seeds") is None or t["seeds"].tolist() != list(seeds) or tuple(t["images"].shape[1:]) != tuple(shape):
        raise UserError(f"{path} holds other samples than this run makes (another sample.batch or run); rerun the "
                        f"stage with --force to start it over")
    made = load_tensor_metadata(path).get("numerics")
    if made != now:
        print(f"[sample] {path.name} was made under other numerics ({made} -> {now}); making it again")
        return None
    return t["images"]


def prune_near_duplicates(x, keep):
    """Indices of `keep` samples after repeatedly dropping the later member of the most similar pair
    (pixel cosine), in their original order."""
    f = torch.nn.functional.normalize(x.flatten(1).double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    alive = torch.ones(len(x), dtype=torch.bool)
    while alive.sum() > keep:
        s = sim.clone()
        s[~alive] = -2
        s[:, ~alive] = -2
        i, j = divmod(int(s.argmax()), len(x))
        alive[max(i, j)] = False
    return torch.nonzero(alive).squeeze(1)


def generate_pre(D, cfg, meta, test_split, n_gen, out_dir, device, parts=None):
    """gpre: a surplus of candidates from held-out items (order fixed by the job seed), near-duplicates
    pruned; the first num_attrib are the targets, the rest the controls. `parts`: see sample()."""
    n_cand = min(len(test_split), int(np.ceil(n_gen * cfg.sample.surplus)))
    if n_cand < n_gen:
        raise UserError(f"the test split has {len(test_split)} items but {n_gen} samples are asked for; lower --num_attrib or --control_factor")
    order = torch.randperm(len(test_split), generator=torch.Generator().manual_seed(int(cfg.seed)))[:n_cand]
    items = test_split.subset(order)
    labels = labels_of(items, cfg.model, meta)
    shape = tuple(test_split.images.shape[1:])
    x = sample(D, cfg, items.ids.tolist(), labels, shape, device, desc="gpre", parts=parts)
    keep = prune_near_duplicates(x, n_gen)
    save_samples(out_dir, x[keep], items.ids[keep], items.labels[keep], None if labels is None else labels[keep],
                 cfg.num_attrib)
    return x[keep]


def generate_post(D, cfg, pre_samples, out_dir, device, parts=None):
    """gpost: the same seeds and conditions as gpre, through the retrained model. `parts`: see sample()."""
    shape = tuple(pre_samples["images"].shape[1:])
    x = sample(D, cfg, pre_samples["seeds"].tolist(), pre_samples.get("cond"), shape, device, desc="gpost",
               parts=parts)
    save_samples(out_dir, x, pre_samples["seeds"], pre_samples["labels"], pre_samples.get("cond"),
                 int(pre_samples["num_attrib"]))
    return x


def save_samples(out_dir, images, seeds, labels, cond, num_attrib):
    t = dict(images=images, seeds=seeds.long(), labels=labels.long(), num_attrib=torch.tensor(num_attrib))
    if cond is not None:
        t["cond"] = cond
    save_tensors(Path(out_dir) / SAMPLES, t)
    save_grid(Path(out_dir) / "samples.png", images, num_attrib)


def load_samples(run_dir, stage="gpre"):
    t = load_tensors(Path(run_dir) / SAMPLES, what="samples file", hint=f"rerun --what={stage}")
    if not {"images", "seeds", "labels", "num_attrib"} <= set(t):
        raise UserError(f"{Path(run_dir) / SAMPLES} is not a samples file of this toolkit; rerun --what={stage}")
    return t


def save_grid(path, images, num_attrib, nrow=None):
    """PNG grid: targets first, then controls."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, min(20, num_attrib))
    with atomic_path(path) as tmp:
        save_image((images + 1) / 2, str(tmp), nrow=nrow, padding=1, format="png")


def load_user_targets(path, meta):
    """Targets supplied by the user: a folder of PNGs or a .safetensors file with `images` in [-1, 1]."""
    from PIL import Image

    path, res, ch = Path(path), meta["resolution"], meta["channels"]
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise UserError(f"no PNG files in {path}; give a folder of PNGs or a .safetensors file with 'images'")
        mode = "L" if ch == 1 else "RGB"
        arr = [np.asarray(Image.open(f).convert(mode).resize((res, res), Image.BICUBIC)) for f in files]
        x = torch.as_tensor(np.stack(arr)).float().reshape(len(arr), res, res, ch).permute(0, 3, 1, 2) / 127.5 - 1
    elif path.suffix == ".safetensors":
        x = load_tensors(path, what="targets file").get("images")
        if x is None:
            raise UserError(f"{path} has no 'images' tensor; save the targets as images [N, C, H, W] in [-1, 1]")
    else:
        raise UserError(f"targets {path} must be a folder of PNGs or a .safetensors file")
    if tuple(x.shape[1:]) != (ch, res, res):
        raise UserError(f"targets in {path} have shape {tuple(x.shape[1:])}, the dataset needs {(ch, res, res)}")
    return x.float()
