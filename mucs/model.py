"""Build a denoiser D(x, sigma, y) from the model config and the dataset's meta; save and load its weights."""
import contextlib
import copy

import torch
import torch.nn.functional as F_

from mucs.diffusion import PRECONDS
from mucs.errors import UserError
from mucs.io import load_tensors, save_tensors
from mucs.nets import build_net


def label_dim(model_cfg, meta):
    """Width of the condition vector y: one-hot classes, a text embedding, or 0 (unconditional)."""
    if not model_cfg.conditional or meta["cond"] == "none":
        return 0
    return meta["num_classes"] if meta["cond"] == "class" else meta["cond_dim"]


def build_denoiser(model_cfg, meta, device=None):
    """The denoiser of the config; device="meta" builds shapes only (to count parameters)."""
    if str(model_cfg.net).startswith("diffusers") and label_dim(model_cfg, meta) and meta["cond"] != "class":
        raise UserError(f"diffusers backbones take class labels, but this dataset's condition is {meta['cond']!r}; "
                        f"set model.conditional=false")
    with torch.device(device) if device else contextlib.nullcontext():
        net = build_net(model_cfg.net, model_cfg.net_kwargs, img_resolution=meta["resolution"],
                        in_channels=meta["channels"], out_channels=meta["channels"],
                        label_dim=label_dim(model_cfg, meta), augment_dim=model_cfg.augment_dim)
    return build_precond(net, model_cfg.precond)


def build_precond(net, cfg):
    """A preconditioner from the model config's `precond` block."""
    kw = dict(cfg)
    kind = kw.pop("kind")
    if kind == "ddpm":  # a diffusers scheduler's discrete-time parametrisation
        from mucs.diffusers_adapter import DDPMPrecond
        return DDPMPrecond(net, **kw)
    if kind not in PRECONDS:
        raise ValueError(f"unknown preconditioner {kind!r}; choose from {sorted(PRECONDS) + ['ddpm']}")
    return PRECONDS[kind](net, **kw)


def labels_of(split, model_cfg, meta, caption=None):
    """Condition vectors [N, label_dim] for a split (None if unconditional). For text conditions `caption`
    picks one caption per item (an index tensor [N]); by default the first, as at evaluation."""
    d = label_dim(model_cfg, meta)
    if d == 0:
        return None
    if meta["cond"] == "class":
        return F_.one_hot(split.labels.clamp_min(0), d).float()
    k = torch.zeros(len(split), dtype=torch.long) if caption is None else caption
    return split.conds[torch.arange(len(split)), k]


def save_weights(path, module, info=None):
    save_tensors(path, dict(module.state_dict()), metadata=info)


def load_weights(path, module, what="model weights"):
    state = load_tensors(path, what=what)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the configured model ({str(e).splitlines()[0][:100]}); "
                        f"it was trained with another model config: use the run's saved config or retrain")
    return module


def load_denoiser(model_cfg, meta, path, device="cpu"):
    """The denoiser with weights from `path`, in eval mode (no dropout), frozen."""
    D = load_weights(path, build_denoiser(model_cfg, meta)).to(device).eval()
    return D.requires_grad_(False)


def export_diffusers(model_cfg, meta, weights, folder):
    """Also write the weights file of a diffusers-backbone model as a diffusers pipeline folder (DDPMPipeline
    layout: unet/ + scheduler/); nothing for the toolkit's own networks. Returns the folder or None."""
    from mucs.diffusers_adapter import export_pipeline, is_diffusers

    if not is_diffusers(model_cfg):
        return None
    return export_pipeline(load_weights(weights, build_denoiser(model_cfg, meta)), folder)


def import_pretrained(cfg, meta, out_dir):
    """tpre with pretrained=<folder>: the folder's model, loaded by diffusers, written as this run's
    model-best/-last.safetensors (the toolkit's denoiser around it; both files hold the same weights)."""
    from pathlib import Path
    from mucs.diffusers_adapter import load_pretrained

    D = build_denoiser(cfg.model, meta)
    D.net.model.load_state_dict(load_pretrained(cfg.pretrained).state_dict())
    for name in ("model-best", "model-last"):
        save_weights(Path(out_dir) / f"{name}.safetensors", D, dict(source=str(cfg.pretrained)))
    print(f"[tpre] imported the diffusers model of {cfg.pretrained} into {out_dir} (no training)")


def clone(D):
    return copy.deepcopy(D)
