"""Pre-vs-post similarity metrics of eval. Each maps two image batches in [-1, 1] to one value per
sample; `higher_is_similar` says which way is "unchanged" (distances are False)."""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F_

from mucs.errors import UserError

PUBLISHED = ["ssim", "sscd", "lpips", "clip", "dino"]
NO_DOWNLOAD = ["ssim", "feat", "cosine", "corr", "mse", "mae"]
PRETRAINED = {"sscd": "sscd", "clip": "clip", "dino": "dinov2"}


@dataclass
class Metric:
    name: str
    fn: Callable  # (pre, post) -> tensor [N]
    higher_is_similar: bool = True

    def __call__(self, pre, post, batch=256):
        out = [self.fn(pre[i: i + batch], post[i: i + batch]) for i in range(0, len(pre), batch)]
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def ssim(upsample=1):
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

    def fn(a, b):
        a, b = (a + 1) / 2, (b + 1) / 2
        if upsample > 1:  # the 7x7 window does not fit tiny images
            a, b = (F_.interpolate(t, scale_factor=upsample, mode="nearest") for t in (a, b))
        return ssim_fn(a, b, kernel_size=7, sigma=1.5, data_range=1.0, reduction="none")
    return fn


def cosine(a, b):
    return F_.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def corr(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return F_.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)


def embedding_cosine(net, device):
    @torch.no_grad()
    def fn(a, b):
        return F_.cosine_similarity(net(a.to(device)), net(b.to(device)), dim=1).cpu()
    return fn


def make_metric(name, data_folder, data_name, cache_dir, ssim_upsample=1, device="cpu"):
    if name == "ssim":
        return Metric(name, ssim(ssim_upsample))
    if name == "mse":
        return Metric(name, lambda a, b: (a - b).square().flatten(1).mean(1), higher_is_similar=False)
    if name == "mae":
        return Metric(name, lambda a, b: (a - b).abs().flatten(1).mean(1), higher_is_similar=False)
    if name == "cosine":
        return Metric(name, cosine)
    if name == "corr":
        return Metric(name, corr)
    if name == "feat":
        from mucs.classifier import load_or_train
        net = load_or_train(data_folder, cache_dir, data_name).to(device)
        return Metric(name, embedding_cosine(net.features, device))
    if name == "lpips":
        from mucs.pretrained import load_lpips
        net = load_lpips(cache_dir).to(device)
        return Metric(name, lambda a, b: net(a.to(device), b.to(device)).cpu())
    if name in PRETRAINED:
        from mucs.pretrained import load_embedder
        return Metric(name, embedding_cosine(load_embedder(PRETRAINED[name], cache_dir).to(device), device))
    raise UserError(f"unknown metric {name!r}; choose from {', '.join(NO_DOWNLOAD + PUBLISHED[1:])}, "
                    f"'published' or 'all_available'")


def resolve(spec):
    """A --metrics value -> (names, skip_missing): a list, 'published', or 'all_available'."""
    if spec in (None, ""):
        return ["ssim", "feat", "cosine", "corr", "mse", "mae"], False
    if spec == "published":
        return PUBLISHED, False
    if spec == "all_available":
        return NO_DOWNLOAD + PUBLISHED[1:], True
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for n in names:
        if n not in NO_DOWNLOAD + PUBLISHED:
            raise UserError(f"unknown metric {n!r}; choose from {', '.join(NO_DOWNLOAD + PUBLISHED[1:])}, "
                            f"'published' or 'all_available'")
    return names, False
