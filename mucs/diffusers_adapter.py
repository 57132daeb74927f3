"""diffusers models as the toolkit's denoisers D(x, sigma, y): the `diffusers_unet` / `diffusers_dit` family.

A discrete-time DDPM model predicts from x_t = sqrt(abar_t) y + sqrt(1 - abar_t) n at timestep t. In the
toolkit's variance-exploding form x = y + sigma n the same point is x_t = x / sqrt(1 + sigma^2) with
sigma_t = sqrt((1 - abar_t) / abar_t), so any sigma maps to a (fractional) timestep and the model becomes a
denoiser that every stage and method uses unchanged. abar_t comes from the scheduler's own betas.

Also here: loading a pretrained diffusers folder (`pretrained=`), writing trained models as diffusers folders,
and sampling with a diffusers scheduler (`sample.sampler=diffusers`).
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from mucs.errors import UserError

NETS = {"diffusers_unet": "UNet2DModel", "diffusers_dit": "DiTTransformer2DModel"}
FAMILY = {cls: name for name, cls in NETS.items()}
COMPONENTS = ("unet", "transformer")  # a pipeline's denoiser component
PREDICTIONS = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           "diffusion_pytorch_model.bin")
PRIVATE = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def is_diffusers(model_cfg):
    """Whether a model config block builds a diffusers network (model.net diffusers_unet or diffusers_dit)."""
    return str(model_cfg.net) in NETS


def plain(d):
    """A config block as plain Python values (diffusers serialises its configs to JSON)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.create(dict(d or {})), resolve=True)


# ---------------------------------------------------------------------------------------------
# The raw network: a diffusers model called as F(x_t, t, labels)


class DiffusersNet(nn.Module):
    """F(x_t, t, labels, aug) over a diffusers UNet2DModel or DiTTransformer2DModel. Condition vectors (one-hot,
    or all zero for "no condition") become class indices; the "no condition" index is the model's extra
    class embedding (the last row of a table with num_classes + 1 rows). Outputs of learned-variance models
    (2C channels) are cut to the image's C channels. Parameters are named `model.<diffusers name>`."""

    def __init__(self, model, channels, num_classes):
        super().__init__()
        self.model, self.channels, self.num_classes = model, channels, num_classes
        if FAMILY[type(model).__name__] == "diffusers_dit":
            # diffusers' DiT drops labels itself in train mode (p 0.1, its own random draws); the toolkit drops
            # them with train.cond_dropout from the seeded step generator instead
            for m in model.modules():
                if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                    m.dropout_prob = 0.0
            self.null = model.config.num_embeds_ada_norm  # the CFG row the table always has
        else:
            n = model.config.num_class_embeds
            self.null = n - 1 if n is not None and n > num_classes else None

    def class_labels(self, labels, n, device):
        """The class indices [n] that the diffusers model takes for condition vectors `labels` [n, classes]
        (one-hot; None or all-zero rows mean "no condition", the model's extra last class row), or None for an
        unconditional UNet."""
        dit = FAMILY[type(self.model).__name__] == "diffusers_dit"
        if self.num_classes == 0:  # unconditional job: no labels (UNet), the "no condition" row (DiT)
            return torch.full((n,), self.null, device=device, dtype=torch.long) if dit else None
        if labels is None:
            labels = torch.zeros(n, self.num_classes, device=device)
        none = labels.abs().sum(1) == 0
        if self.null is None and bool(none.any()):
            raise UserError("this diffusers model has no 'no condition' class embedding (num_class_embeds equals the "
                            "number of classes): set sample.guidance=1, train.cond_dropout=0 and groups.score.condition=true")
        idx = labels.argmax(1)
        return idx if self.null is None else torch.where(none, self.null, idx)

    def forward(self, x, t, labels=None, augment_labels=None):
        """F(x_t, t, labels): the diffusers model's output for inputs x [B, C, H, W] at (fractional) timesteps t
        [B], cut to the image channels (a learned-variance output loses its variance half)."""
        out = self.model(x, t, class_labels=self.class_labels(labels, len(x), x.device)).sample
        return out[:, : self.channels]

    def plain_attention(self):
        """A context in which attention uses diffusers' plain (non-fused) processor: per-sample gradients through
        torch.func.vmap fail through fused SDPA kernels on some devices."""
        from diffusers.models.attention_processor import AttnProcessor

        @contextlib.contextmanager
        def ctx():
            if not hasattr(self.model, "attn_processors") or not self.model.attn_processors:
                yield
                return
            old = self.model.attn_processors
            self.model.set_attn_processor(AttnProcessor())
            try:
                yield
            finally:
                self.model.set_attn_processor(old)
        return ctx()


def build_net(name, config, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0):
    """A fresh diffusers model of the config dict `config` (the YAML's net_kwargs or a folder's config.json),
    with the dataset's size, channels and classes filled in or checked."""
    import diffusers

    if augment_dim:
        raise UserError("diffusers backbones take no augmentation label: set model.augment_dim=0 (and train.augment_p=0)")
    config = {k: v for k, v in plain(config).items() if k not in PRIVATE}
    config = dataset_fit(name, config, img_resolution, in_channels, label_dim)
    try:
        model = getattr(diffusers, NETS[name])(**config)
    except (TypeError, ValueError) as e:
        raise UserError(f"model.net_kwargs do not make a {NETS[name]}: {' '.join(str(e).split())[:200]}")
    return DiffusersNet(model, in_channels, label_dim)


def dataset_fit(name, config, resolution, channels, num_classes):
    """The config with sample_size / in_channels / out_channels / class count set from the dataset, or a
    UserError where the config says otherwise."""
    config = dict(config)

    def need(key, value, ok=None):
        if config.get(key) is None:
            config[key] = value
        elif not (ok(config[key]) if ok else config[key] == value):
            raise UserError(f"the diffusers model's {key} is {config[key]} but the dataset needs {value}; use a model "
                            f"made for this dataset (resolution {resolution}, {channels} channels, {num_classes} classes)")

    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        config["sample_size"] = size[0] if len(set(size)) == 1 else size
    need("sample_size", resolution)
    need("in_channels", channels)
    need("out_channels", channels, lambda c: c in (channels, 2 * channels))  # 2C: learned variance, cut to C
    if name == "diffusers_unet":
        if num_classes == 0 and config.get("num_class_embeds") is not None:
            raise UserError(f"the diffusers UNet is class-conditional (num_class_embeds {config['num_class_embeds']}) "
                            f"but the job is unconditional; set model.conditional=true")
        if num_classes:
            need("num_class_embeds", num_classes + 1, lambda n: n in (num_classes, num_classes + 1))
    else:
        need("num_embeds_ada_norm", max(num_classes, 1), lambda n: n == num_classes or num_classes == 0)
    return config


# ---------------------------------------------------------------------------------------------
# The preconditioner: the scheduler's parametrisation as D(x, sigma, y)


def scheduler_config(precond):
    """The diffusers scheduler config of a `ddpm` precond block (a dict or DictConfig)."""
    p = plain(precond)
    return dict(num_train_timesteps=int(p.get("num_train_timesteps", 1000)), beta_schedule=p.get("beta_schedule", "linear"),
                beta_start=float(p.get("beta_start", 1e-4)), beta_end=float(p.get("beta_end", 0.02)),
                prediction_type=p.get("prediction_type", "epsilon"), **dict(p.get("scheduler_kwargs") or {}))


def make_scheduler(precond, cls=None):
    """The scheduler class `cls` (default: the precond's own, e.g. DDPMScheduler) with the model's betas."""
    import diffusers

    name = cls or dict(precond).get("scheduler", "DDPMScheduler")
    klass = getattr(diffusers, str(name), None)
    if klass is None or not hasattr(klass, "set_timesteps"):
        raise UserError(f"unknown diffusers scheduler {name!r}; use a class of diffusers.schedulers (e.g. DDPMScheduler, "
                        f"DDIMScheduler, DPMSolverMultistepScheduler)")
    return klass.from_config(scheduler_config(precond))


class DDPMPrecond(nn.Module):
    """D(x, sigma, y) of a discrete-time model under its scheduler: the network sees x_t = x / sqrt(1 + sigma^2) at
    t(sigma), interpolated in log sigma between the training timesteps (exact at sigma_t); its output is read as
    epsilon (D = x - sigma eps), v (D = abar^(1/2) x_t - (1 - abar)^(1/2) v) or the sample itself. loss_weight makes
    per_sample_loss the scheduler's own training loss: the MSE of epsilon, v or x_0."""

    kind = "ddpm"

    def __init__(self, net, scheduler="DDPMScheduler", num_train_timesteps=1000, beta_schedule="linear",
                 beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", scheduler_kwargs=None):
        super().__init__()
        import diffusers

        if prediction_type not in PREDICTIONS:
            raise UserError(f"model.precond.prediction_type {prediction_type!r} is not one of {', '.join(PREDICTIONS)}")
        if beta_schedule not in BETA_SCHEDULES and not (scheduler_kwargs or {}).get("trained_betas"):
            raise UserError(f"model.precond.beta_schedule {beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
        self.net, self.prediction_type = net, prediction_type
        self.config = dict(scheduler=scheduler, num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                           beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                           scheduler_kwargs=plain(scheduler_kwargs))
        abar = diffusers.DDPMScheduler.from_config(scheduler_config(self.config)).alphas_cumprod.double()
        sigmas = ((1 - abar) / abar).sqrt()
        if not torch.isfinite(sigmas).all() or not (sigmas[1:] > sigmas[:-1]).all():
            raise UserError("the scheduler's noise levels are not finite and increasing (e.g. a zero terminal SNR); "
                            "this model cannot be written as a denoiser D(x, sigma)")
        self.sigmas = sigmas  # sigma_t, t = 0 .. T-1, on the CPU for train_sigma
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def timestep(self, sigma):
        """t(sigma): fractional timestep, linear in log sigma between neighbouring sigma_t."""
        ls = self.log_sigmas
        s = sigma.to(ls).log().clamp(ls[0], ls[-1])
        i = torch.searchsorted(ls, s).clamp(1, len(ls) - 1)
        lo, hi = ls[i - 1], ls[i]
        return i - 1 + (s - lo) / (hi - lo)

    def sigma_at(self, t):
        """sigma_t of integer timesteps (a tensor or a number)."""
        return self.sigmas[torch.as_tensor(t, dtype=torch.long).cpu()]

    def forward(self, x, sigma, labels=None, augment_labels=None):
        """D(x, sigma, labels): the denoised estimate [B, C, H, W] of x = x_0 + sigma eps at noise levels sigma [B],
        from the network's epsilon, v or sample prediction at the timesteps t(sigma)."""
        t = self.timestep(sigma.flatten()).to(torch.float32)
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_in = 1 / (sigma ** 2 + 1).sqrt()  # sqrt(abar)
        F = self.net(c_in * x, t, labels, augment_labels)
        if self.prediction_type == "epsilon":
            return x - sigma * F
        if self.prediction_type == "v_prediction":  # x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
            return c_in * (c_in * x) - sigma * c_in * F
        return F

    def train_sigma(self, n, generator=None):
        """t ~ U{0, ..., T-1}, as diffusers' training scripts draw it; sigma = sigma_t."""
        return self.sigmas[torch.randint(len(self.sigmas), (n,), generator=generator)].float()

    def loss_weight(self, sigma):
        """||D - y||^2 times this is the MSE of the model's own target: epsilon 1/sigma^2, v (1 + sigma^2)/sigma^2."""
        if self.prediction_type == "epsilon":
            return 1 / sigma ** 2
        if self.prediction_type == "v_prediction":
            return (1 + sigma ** 2) / sigma ** 2
        return torch.ones_like(sigma)


# ---------------------------------------------------------------------------------------------
# Sampling with a diffusers scheduler


@torch.no_grad()
def scheduler_sampler(D, latents, scheduler, num_steps, labels=None, guidance=1.0, generators=None, trace=None):
    """Images from unit-noise latents with a diffusers scheduler's own step rule (DDPM ancestral, DDIM, DPM-Solver,
    ...). The denoiser D (with guidance) gives x_0; it is handed to the scheduler in its prediction_type.
    `generators` (one per sample) supply the step noise of stochastic schedulers. `trace` (a list) receives
    (sigma_t, x_t / sqrt(abar_t)) at every step: the trajectory in the denoiser's form x = y + sigma n."""
    from mucs.diffusion import guided

    Dg, P = guided(D, guidance), D
    scheduler.set_timesteps(num_steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    one = torch.ones(len(x), device=x.device)
    for t in scheduler.timesteps:
        x_t = scheduler.scale_model_input(x, t)  # the model's input: the VP-form x_t
        sigma = P.sigma_at(t).to(x.device, torch.float32)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        if trace is not None:
            trace.append((float(sigma), (x_t / c_in).float()))
        x0 = Dg(x_t / c_in, sigma * one, labels).to(x_t.dtype)
        kind = scheduler.config.prediction_type
        if kind == "sample":
            out = x0
        else:
            eps = (x_t / c_in - x0) / sigma
            out = eps if kind == "epsilon" else c_in * eps - sigma * c_in * x0
        x = scheduler.step(out, t, x, generator=generators).prev_sample
    return x


# ---------------------------------------------------------------------------------------------
# Pretrained folders in, diffusers folders out


def find_model_folder(folder):
    """(model subfolder, scheduler config path or None) of a diffusers pipeline or model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"pretrained={folder} is not a folder; give a local diffusers pipeline folder (model_index.json) "
                        f"or model folder (config.json + weights)")
    if (folder / "model_index.json").exists():
        index = read_config(folder / "model_index.json")
        comp = [c for c in COMPONENTS if c in index]
        if not comp:
            raise UserError(f"{folder / 'model_index.json'} names no denoiser component ({' or '.join(COMPONENTS)}); "
                            f"give a pipeline of a UNet2DModel or DiTTransformer2DModel")
        sched = folder / "scheduler" / "scheduler_config.json"
        return folder / comp[0], sched if sched.exists() else None
    if (folder / "config.json").exists():
        sched = folder / "scheduler_config.json"
        return folder, sched if sched.exists() else None
    raise UserError(f"pretrained={folder} is not a diffusers folder (no model_index.json or config.json); save the "
                    f"model with save_pretrained")


def read_config(path):
    """A diffusers JSON config file as a dict; a UserError if it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}); the diffusers folder is damaged")


def weights_file(model_dir):
    """The weights file of a diffusers model folder (safetensors before .bin); a UserError if there is none."""
    found = [Path(model_dir) / w for w in WEIGHTS if (Path(model_dir) / w).exists()]
    if not found:
        raise UserError(f"no weights in {model_dir} (looked for {', '.join(WEIGHTS)}); the folder is incomplete")
    return found[0]


def pretrained_model_cfg(folder, model_cfg):
    """The model config block of a pretrained folder: its network config and, from its scheduler, the precond.
    Without a scheduler config in the folder the job's own `ddpm` precond is used."""
    model_dir, sched = find_model_folder(folder)
    config = read_config(model_dir / "config.json")
    cls = config.get("_class_name")
    if cls not in FAMILY:
        raise UserError(f"{model_dir / 'config.json'} is a {cls}; pretrained= takes a {' or '.join(FAMILY)}")
    weights_file(model_dir)
    if sched is not None:
        s = read_config(sched)
        known = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
        extra = {k: v for k, v in s.items() if k not in known + PRIVATE}
        precond = dict(kind="ddpm", scheduler=s.get("_class_name", "DDPMScheduler"),
                       **{k: s[k] for k in known if k in s}, scheduler_kwargs=extra)
    elif dict(model_cfg.precond).get("kind") == "ddpm":
        precond = dict(model_cfg.precond)
    else:
        raise UserError(f"{folder} has no scheduler config (scheduler/scheduler_config.json or scheduler_config.json); "
                        f"add one, or pass model=diffusers_unet to use that config's DDPM schedule")
    net_kwargs = {k: v for k, v in config.items() if k not in PRIVATE}
    conditional = net_kwargs.get("num_class_embeds") is not None if cls == "UNet2DModel" else \
        (net_kwargs.get("num_embeds_ada_norm") or 0) > 1
    return dict(net=FAMILY[cls], net_kwargs=net_kwargs, precond=precond, conditional=conditional, augment_dim=0)


def load_pretrained(folder):
    """The diffusers model of a pretrained folder, loaded by diffusers itself (local files only, safetensors
    preferred; .bin files are read with weights_only=True)."""
    import diffusers

    model_dir, _ = find_model_folder(folder)
    cls = read_config(model_dir / "config.json")["_class_name"]
    use_st = weights_file(model_dir).name.endswith((".safetensors", ".index.json"))
    try:
        return getattr(diffusers, cls).from_pretrained(str(model_dir), local_files_only=True, use_safetensors=use_st,
                                                       low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise UserError(f"diffusers could not load {model_dir}: {' '.join(str(e).split())[:200]}")


def export_pipeline(D, folder):
    """Write denoiser D (a DDPMPrecond over a DiffusersNet) as a diffusers pipeline folder that
    DDPMPipeline.from_pretrained loads: `unet/` (the model, safetensors) and `scheduler/`. Atomic: the folder
    appears complete or not at all."""
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe = diffusers.DDPMPipeline(unet=D.net.model, scheduler=make_scheduler(D.config))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
