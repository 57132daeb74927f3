"""Offline loaders for the published evaluation networks: SSCD, CLIP, DINOv2 (image embedders), LPIPS
(a pair similarity) and the CLIP text encoder used to embed COCO captions.

Nothing here downloads. Each network is read from a cache folder (the argument, else $MUCS_CACHE, else
<repo>/pointer_to/cache) or from the usual torch.hub / Hugging Face cache; a missing file is a one-line
UserError naming the file, where it comes from and the folders searched.

Embedders map images in [-1, 1], [B, C, H, W] with C = 1 or 3 and any size, to L2-normalised embeddings
[B, D]; the resize and normalisation each network was trained with happen inside.
"""
import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mucs.errors import UserError
from mucs.io import torch_load

EMBEDDERS = ("sscd", "clip", "dinov2")
NAMES = EMBEDDERS + ("lpips",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SSCD_FILE = "sscd_disc_mixup.torchscript.pt"
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
SSCD_SIZE = 288  # the README's "small_288" evaluation transform: shorter side to 288

CLIP_ARCH, CLIP_TAG = "ViT-L-14", "laion2b_s32b_b82k"
CLIP_HF_REPO = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

DINO_ENTRY = "dinov2_vitb14"
DINO_REPO = "facebookresearch_dinov2_main"  # the folder name torch.hub gives github.com/facebookresearch/dinov2
DINO_FILE = "dinov2_vitb14_pretrain.pth"
DINO_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
DINO_SIZE = 224

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_MIN_SIZE = 64  # VGG's fifth stage needs 16 px; upsample small images so every stage sees a few pixels


# ---------------------------------------------------------------------------------------------
# where files are looked for


def cache_root(cache_dir=None) -> Path:
    """The argument, else $MUCS_CACHE, else <repo>/pointer_to/cache."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("MUCS_CACHE"):
        return Path(os.environ["MUCS_CACHE"]).expanduser()
    return Path(__file__).resolve().parents[1] / "pointer_to" / "cache"


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir())  # $TORCH_HOME/hub, default ~/.cache/torch/hub


def _hf_hub_dirs():
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    home = os.environ.get("HF_HOME")
    dirs.append(Path(home).expanduser() / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def _unique(paths):
    out = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _sscd_dirs(root):
    return _unique([root, root / "checkpoints", _torch_hub_dir() / "checkpoints"])


def _dino_repo_dirs(root):
    return _unique([root / "hub" / DINO_REPO, root / DINO_REPO, _torch_hub_dir() / DINO_REPO])


def _dino_weight_dirs(root):
    return _unique([root / "hub" / "checkpoints", root / "checkpoints", root, _torch_hub_dir() / "checkpoints"])


def _vgg_dirs(root):
    return _unique([root / "checkpoints", root / "hub" / "checkpoints", root, _torch_hub_dir() / "checkpoints"])


def _clip_dirs(root):
    """Flat folders first, then Hugging Face hub layouts (models--org--name/snapshots/<rev>/)."""
    hub_name = "models--" + CLIP_HF_REPO.replace("/", "--")
    flat = [root / "open_clip", root]
    hubs = [root / "open_clip" / hub_name] + [d / hub_name for d in _hf_hub_dirs()]
    return flat, hubs


def _find_file(names, dirs):
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _find_clip(root):
    flat, hubs = _clip_dirs(root)
    hit = _find_file(CLIP_FILES, flat)
    if hit:
        return hit
    for hub in hubs:
        snaps = hub / "snapshots"
        if not snaps.is_dir():
            continue
        ref = hub / "refs" / "main"
        revs = [ref.read_text().strip()] if ref.is_file() else []
        revs += sorted(p.name for p in snaps.iterdir())
        hit = _find_file(CLIP_FILES, [snaps / r for r in revs])
        if hit:
            return hit
    return None


def _missing(what, file, dirs, source):
    dirs = [str(d) for d in dirs]
    return UserError(f"{what} not found: place {file} ({source}) in {dirs[0]}/ "
                     f"(looked in: {', '.join(dirs)}); or set MUCS_CACHE / pass the cache folder")


def _locate(name, root):
    """Paths of the files a network needs, or a UserError saying which one is missing."""
    if name == "sscd":
        dirs = _sscd_dirs(root)
        return {"weights": _find_file([SSCD_FILE], dirs) or _missing("SSCD weights", SSCD_FILE, dirs, SSCD_URL)}
    if name == "clip":
        flat, hubs = _clip_dirs(root)
        return {"weights": _find_clip(root) or _missing(
            f"CLIP {CLIP_ARCH} {CLIP_TAG} weights", " or ".join(CLIP_FILES), flat + [h / "snapshots" / "*" for h in hubs],
            f"huggingface.co/{CLIP_HF_REPO}")}
    if name == "dinov2":
        rdirs, wdirs = _dino_repo_dirs(root), _dino_weight_dirs(root)
        repo = next((d for d in rdirs if (d / "hubconf.py").is_file()), None)
        return {"repo": repo or _missing("DINOv2 code (torch.hub repo folder)", f"a clone of github.com/facebookresearch/dinov2 named {DINO_REPO}/ with hubconf.py",
                                         [d.parent for d in rdirs], "git clone https://github.com/facebookresearch/dinov2"),
                "weights": _find_file([DINO_FILE], wdirs) or _missing("DINOv2 weights", DINO_FILE, wdirs, DINO_URL)}
    if name == "lpips":
        dirs = _vgg_dirs(root)
        return {"weights": _find_file([VGG_FILE], dirs) or _missing("VGG16 weights for LPIPS", VGG_FILE, dirs, VGG_URL)}
    raise UserError(f"unknown pretrained network {name!r}; choose from {', '.join(NAMES)}")


def available(name, cache_dir=None) -> bool:
    """True if every file network `name` needs is in place (nothing is loaded)."""
    files = _locate(name, cache_root(cache_dir))
    return all(not isinstance(p, UserError) for p in files.values())


def _paths(name, cache_dir):
    files = _locate(name, cache_root(cache_dir))
    for p in files.values():
        if isinstance(p, UserError):
            raise p
    return files


@contextlib.contextmanager
def _offline():
    """Make sure no library reaches for the network while a network is being built."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# image preprocessing inside the modules


def to_rgb(x):
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_shorter(x, size, mode="bilinear", crop=True):
    """Resize so the shorter side is `size` (antialiased), then centre-crop to size x size if `crop`."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    hw = (size, max(size, round(w * s))) if h <= w else (max(size, round(h * s)), size)
    if (h, w) != hw:
        x = F.interpolate(x, size=hw, mode=mode, align_corners=False, antialias=True)
    if crop:
        top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
        x = x[..., top: top + size, left: left + size]
    return x


class ImageEmbedder(nn.Module):
    """[-1, 1] images -> resize -> mean/std normalisation -> net -> L2-normalised [B, D]."""

    def __init__(self, net, size, mean, std, mode="bilinear", crop=True):
        super().__init__()
        self.net, self.size, self.mode, self.crop = net, size, mode, crop
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x):
        x = (to_rgb(x.float()) + 1) / 2
        x = resize_shorter(x, self.size, self.mode, self.crop).clamp(0, 1)  # bicubic overshoots; PIL clips too
        return (x - self.mean) / self.std

    def forward(self, x):
        return F.normalize(self.net(self.preprocess(x)).float().flatten(1), dim=1)


def _frozen(module):
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------
# the networks


def _load_sscd(files):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the release is TorchScript
            net = torch.jit.load(str(files["weights"]), map_location="cpu")
    except Exception as e:
        raise UserError(f"corrupted or not a TorchScript file: {files['weights']} ({e.__class__.__name__}); "
                        f"download it again from {SSCD_URL}")
    return ImageEmbedder(net, SSCD_SIZE, IMAGENET_MEAN, IMAGENET_STD, mode="bilinear", crop=False)


def _create_clip(path):
    import open_clip

    tag = open_clip.get_pretrained_cfg(CLIP_ARCH, CLIP_TAG)  # preprocessing of the tag; a file path alone loses it
    try:
        with _offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, _ = open_clip.create_model_and_transforms(
                CLIP_ARCH, pretrained=str(path), image_mean=tag.get("mean"), image_std=tag.get("std"),
                image_interpolation=tag.get("interpolation"), image_resize_mode=tag.get("resize_mode"),
                weights_only=True)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
        raise UserError(f"could not load CLIP {CLIP_ARCH} {CLIP_TAG} from {path} ({msg}); "
                        f"download {CLIP_FILES[0]} again from huggingface.co/{CLIP_HF_REPO}")
    return model


def _load_clip(files):
    model = _create_clip(files["weights"])
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return ImageEmbedder(model.visual, size, cfg["mean"], cfg["std"], mode=cfg.get("interpolation", "bicubic"))


def _load_dinov2(files):
    try:
        with _offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.hub.load(str(files["repo"]), DINO_ENTRY, source="local", pretrained=False)
    except Exception as e:
        raise UserError(f"could not build {DINO_ENTRY} from the hub folder {files['repo']} "
                        f"({e.__class__.__name__}: {str(e)[:100]}); clone github.com/facebookresearch/dinov2 there again")
    state = torch_load(files["weights"], what="DINOv2 weights", hint=f"download it again from {DINO_URL}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{files['weights']} does not fit {DINO_ENTRY} ({str(e).splitlines()[0][:100]}); "
                        f"download it again from {DINO_URL}")
    return ImageEmbedder(net, DINO_SIZE, IMAGENET_MEAN, IMAGENET_STD, mode="bicubic")


def load_embedder(name, cache_dir=None) -> nn.Module:
    """An image embedder ('sscd', 'clip' or 'dinov2') in eval mode with frozen weights:
    forward([B, 1|3, H, W] in [-1, 1]) -> L2-normalised [B, D]."""
    if name == "lpips":
        raise UserError("lpips compares pairs of images, it is not an embedder: use load_lpips")
    if name not in EMBEDDERS:
        raise UserError(f"unknown embedder {name!r}; choose from {', '.join(EMBEDDERS)}")
    files = _paths(name, cache_dir)
    return _frozen({"sscd": _load_sscd, "clip": _load_clip, "dinov2": _load_dinov2}[name](files))


# ---------------------------------------------------------------------------------------------
# LPIPS


class LPIPSSimilarity(nn.Module):
    """1 - LPIPS(VGG, v0.1) of image pairs in [-1, 1]: forward(x, y) -> [B]; 1 means identical."""

    def __init__(self, lpips_net, min_size=LPIPS_MIN_SIZE):
        super().__init__()
        self.lpips, self.min_size = lpips_net, min_size

    def _prep(self, x):
        x = to_rgb(x.float())
        if min(x.shape[-2:]) < self.min_size:
            x = resize_shorter(x, self.min_size, "bilinear", crop=False)
        return x

    def forward(self, x, y):
        return 1 - self.lpips(self._prep(x), self._prep(y)).reshape(len(x))


def _vgg_feature_state(lpips_net, state, path):
    """Rename torchvision's VGG16 keys features.<i>.<p> to the lpips slices' net.slice<k>.<i>.<p>."""
    out = {}
    for key, param in lpips_net.net.state_dict().items():  # e.g. slice3.12.weight
        _, i, p = key.split(".")
        src = f"features.{i}.{p}"
        if src not in state or state[src].shape != param.shape:
            raise UserError(f"{path} is not torchvision's VGG16 state dict (no {src} of shape {tuple(param.shape)}); "
                            f"download it again from {VGG_URL}")
        out[key] = state[src]
    return out


def load_lpips(cache_dir=None) -> LPIPSSimilarity:
    """LPIPS(VGG) as a similarity: the lpips package's linear heads (shipped inside the package) on
    torchvision's VGG16 built without weights and filled from the local vgg16-397923af.pth."""
    import lpips

    files = _paths("lpips", cache_dir)
    state = torch_load(files["weights"], what="VGG16 weights", hint=f"download it again from {VGG_URL}")
    with _offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pnet_rand: torchvision's vgg16 without weights (no download); pretrained: the package's heads
        net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    net.net.load_state_dict(_vgg_feature_state(net, state, files["weights"]), strict=True)
    return _frozen(LPIPSSimilarity(net))


# ---------------------------------------------------------------------------------------------
# CLIP text encoder (COCO captions)


class CLIPTextEncoder:
    """list[str] -> float32 [N, D] L2-normalised CLIP text embeddings (D = 768 for ViT-L-14)."""

    def __init__(self, model, tokenizer, device="cpu", batch=256):
        self.model, self.tokenizer, self.device, self.batch = model.to(device), tokenizer, device, batch

    @torch.no_grad()
    def __call__(self, texts):
        texts = list(texts)
        out = [self.model.encode_text(self.tokenizer(texts[i: i + self.batch]).to(self.device), normalize=True)
               .float().cpu() for i in range(0, len(texts), self.batch)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @property
    def dim(self):
        return self(["a"]).shape[1]


def load_clip_text_encoder(cache_dir=None, device="cpu", batch=256) -> CLIPTextEncoder:
    import open_clip

    path = _paths("clip", cache_dir)["weights"]
    model = _create_clip(path)
    model.visual = nn.Identity()  # the text tower is all we need; free the image tower's memory
    tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
    return CLIPTextEncoder(_frozen(model), tokenizer, device, batch)
