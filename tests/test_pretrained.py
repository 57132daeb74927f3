"""The offline loaders of mucs/pretrained.py, run on small networks saved here in the real file formats and
folder layouts (TorchScript, open_clip checkpoint, torch.hub repo + state dict, torchvision VGG16 state dict)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mucs import pretrained as P
from mucs.errors import UserError


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache folder and private TORCH_HOME / HF_HOME, so no weights stored elsewhere are found by accident."""
    for k in ("MUCS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    cache = tmp_path / "cache"
    cache.mkdir()
    return cache


def images(b, c, h, w, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def imagenet(x01):
    return (x01 - torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(P.IMAGENET_STD).view(1, 3, 1, 1)


def check_embedding(e, b):
    assert e.dtype == torch.float32 and e.ndim == 2 and len(e) == b
    torch.testing.assert_close(e.norm(dim=1), torch.ones(b))


def frozen(module):
    return not module.training and not any(p.requires_grad for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# missing files


@pytest.mark.parametrize("name,file", [("sscd", "sscd_disc_mixup.torchscript.pt"), ("clip", "open_clip_model.safetensors"),
                                       ("dinov2", "facebookresearch_dinov2_main"), ("lpips", "vgg16-397923af.pth")])
def test_missing_file_is_one_line_naming_file_and_folders(env, name, file):
    assert not P.available(name, env)
    with pytest.raises(UserError) as e:
        P.load_lpips(env) if name == "lpips" else P.load_embedder(name, env)
    msg = str(e.value)
    assert "\n" not in msg and file in msg and "looked in:" in msg
    assert str(env) in msg
    if name == "clip":
        assert str(Path(os.environ["HF_HOME"]) / "hub") in msg and str(env / "open_clip") in msg
    else:
        assert str(Path(os.environ["TORCH_HOME"]) / "hub") in msg


def test_default_cache_dir_and_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("MUCS_CACHE", raising=False)
    assert P.cache_root() == Path(P.__file__).resolve().parents[1] / "pointer_to" / "cache"
    monkeypatch.setenv("MUCS_CACHE", str(tmp_path))
    assert P.cache_root() == tmp_path
    assert P.cache_root(tmp_path / "x") == tmp_path / "x"


def test_unknown_names():
    with pytest.raises(UserError, match="unknown"):
        P.load_embedder("vgg")
    with pytest.raises(UserError, match="load_lpips"):
        P.load_embedder("lpips")
    assert set(P.NAMES) == {"sscd", "clip", "dinov2", "lpips"}


# ---------------------------------------------------------------------------------------------
# SSCD: a TorchScript file


class TinySSCD(nn.Module):
    """Describes its input by channel means/stds and its width, so the test sees the preprocessing."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(7, 5)

    def forward(self, x):
        f = torch.cat([x.mean((2, 3)), x.std((2, 3)), torch.full((x.shape[0], 1), x.shape[-1] / 288.0)], 1)
        return self.proj(f) * 10  # not normalised, as SSCD's descriptors


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_sscd_torchscript(env):
    torch.manual_seed(0)
    tiny = TinySSCD()
    torch.jit.script(tiny).save(str(env / "sscd_disc_mixup.torchscript.pt"))
    assert P.available("sscd", env)
    net = P.load_embedder("sscd", env)
    assert frozen(net)
    x = images(3, 3, 32, 48)
    with torch.no_grad():
        e = net(x)
        check_embedding(e, 3)
        # README small_288: shorter side to 288 (32x48 -> 288x432), ImageNet normalisation, no crop
        ref = tiny(imagenet(F.interpolate((x + 1) / 2, size=(288, 432), mode="bilinear", antialias=True)))
        torch.testing.assert_close(e, F.normalize(ref, dim=1), atol=1e-4, rtol=1e-4)
        g = images(2, 1, 16, 16, seed=1)  # grayscale is repeated to RGB
        torch.testing.assert_close(net(g), net(g.repeat(1, 3, 1, 1)))


def test_sscd_corrupted_file(env):
    (env / "sscd_disc_mixup.torchscript.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="corrupted"):
        P.load_embedder("sscd", env)


# ---------------------------------------------------------------------------------------------
# CLIP: open_clip checkpoint of a tiny architecture registered under the ViT-L-14 name


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def tiny_clip(monkeypatch):
    import open_clip
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, P.CLIP_ARCH, TINY_CLIP)
    torch.manual_seed(0)
    model = open_clip.create_model(P.CLIP_ARCH).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def clip_reference(model, x):
    x01 = F.interpolate((x + 1) / 2, size=(28, 28), mode="bicubic", antialias=True).clamp(0, 1)
    return F.normalize(model.visual((x01 - 0.5) / 0.5), dim=1)  # laion2b_s32b_b82k uses mean = std = 0.5


def test_clip_from_flat_safetensors(env, tiny_clip):
    (env / "open_clip").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(env / "open_clip" / "open_clip_model.safetensors"))
    assert P.available("clip", env)
    net = P.load_embedder("clip", env)
    assert frozen(net)
    x = images(2, 3, 56, 56)
    with torch.no_grad():
        e = net(x)
        check_embedding(e, 2)
        assert e.shape == (2, 16)
        torch.testing.assert_close(e, clip_reference(tiny_clip, x), atol=1e-5, rtol=1e-4)


def test_clip_from_hf_hub_layout_bin_and_text_encoder(env, tiny_clip):
    import open_clip

    snap = Path(os.environ["HF_HOME"]) / "hub" / "models--laion--CLIP-ViT-L-14-laion2B-s32B-b82K"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    torch.save(tiny_clip.state_dict(), snap / "snapshots" / "abc123" / "open_clip_pytorch_model.bin")
    assert P.available("clip", env)
    x = images(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(P.load_embedder("clip", env)(x), clip_reference(tiny_clip, x.repeat(1, 3, 1, 1)),
                                   atol=1e-5, rtol=1e-4)
        enc = P.load_clip_text_encoder(env)
        texts = ["a photo of a cat", "two dogs on a beach", "a red bus"]
        t = enc(texts)
        check_embedding(t, 3)
        ref = tiny_clip.encode_text(open_clip.get_tokenizer(P.CLIP_ARCH)(texts), normalize=True)
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=1e-4)
    assert (t[0] - t[1]).abs().max() > 1e-3
    assert enc([]).shape == (0, 16)


def test_clip_checkpoint_of_another_architecture(env, tiny_clip):
    (env / "open_clip").mkdir()
    save_file({"visual.proj": torch.zeros(3, 3)}, str(env / "open_clip" / "open_clip_model.safetensors"))
    with pytest.raises(UserError, match="could not load CLIP") as e:
        P.load_embedder("clip", env)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# DINOv2: a local torch.hub repo folder + the weights file


HUBCONF = '''
import torch
from torch import nn

dependencies = ["torch"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 14, stride=14)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.patch_embed(x).flatten(2).mean(2))


def dinov2_vitb14(*, pretrained=True, **kwargs):
    if pretrained:
        raise RuntimeError("the test hub repo cannot download")
    return Tiny()
'''


def test_dinov2_local_hub_repo(env):
    repo = env / "hub" / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(HUBCONF)
    with pytest.raises(UserError, match="dinov2_vitb14_pretrain.pth") as e:  # code present, weights missing
        P.load_embedder("dinov2", env)
    assert "\n" not in str(e.value)
    g = torch.Generator().manual_seed(0)
    state = {"patch_embed.weight": torch.randn(8, 3, 14, 14, generator=g) * 0.05, "patch_embed.bias": torch.randn(8, generator=g),
             "norm.weight": torch.rand(8, generator=g) + 0.5, "norm.bias": torch.randn(8, generator=g)}
    ckpt = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"  # found through $TORCH_HOME too
    ckpt.mkdir(parents=True)
    torch.save(state, ckpt / "dinov2_vitb14_pretrain.pth")
    assert P.available("dinov2", env)
    net = P.load_embedder("dinov2", env)
    assert frozen(net)
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        e = net(x)
        check_embedding(e, 2)
        xp = imagenet(F.interpolate((x + 1) / 2, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1))
        f = F.conv2d(xp, state["patch_embed.weight"], state["patch_embed.bias"], stride=14).flatten(2).mean(2)
        ref = F.layer_norm(f, (8,), state["norm.weight"], state["norm.bias"])
    torch.testing.assert_close(e, F.normalize(ref, dim=1), atol=1e-5, rtol=1e-4)


def test_dinov2_weights_of_another_net(env):
    repo = env / "hub" / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(HUBCONF)
    (env / "hub" / "checkpoints").mkdir()
    torch.save({"other.weight": torch.zeros(2)}, env / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth")
    with pytest.raises(UserError, match="does not fit"):
        P.load_embedder("dinov2", env)


# ---------------------------------------------------------------------------------------------
# LPIPS: torchvision's VGG16 filled from vgg16-397923af.pth + the lpips package's heads


def vgg16_feature_state(seed=0):
    """torchvision VGG16 `features.*` tensors at their real shapes (the loader reads nothing else; the
    classifier part of the real file, ~470 MB, is left out and stands in as one small extra key)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    feats = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(3)
    return feats, state


def lpips_reference(feats, x, y):
    """LPIPS v0.1 written out: scale, VGG16 ReLU1_2..ReLU5_3, unit-normalise channels, weighted squared
    differences by the package's linear heads, spatial mean, sum over layers."""
    import lpips

    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def acts(z):
        z, out = (z - shift) / scale, []
        for i, layer in enumerate(feats):
            z = layer(z)
            if i in (3, 8, 15, 22, 29):
                out.append(z / (z.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(acts(x), acts(y))):
        total = total + ((a - b).square() * heads[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def test_lpips_builds_torchvision_vgg16_from_local_file(env):
    feats, state = vgg16_feature_state()
    (env / "checkpoints").mkdir()
    torch.save(state, env / "checkpoints" / "vgg16-397923af.pth")
    assert P.available("lpips", env)
    net = P.load_lpips(env)
    assert isinstance(net, P.LPIPSSimilarity) and frozen(net)
    torch.testing.assert_close(getattr(net.lpips.net.slice4, "19").weight, state["features.19.weight"])
    x, y = images(3, 3, 64, 64, seed=1), images(3, 3, 64, 64, seed=2)
    y[0] = x[0]
    with torch.no_grad():
        s = net(x, y)
        assert s.shape == (3,)
        assert abs(s[0].item() - 1) < 1e-6 and (s[1:] < 1 - 1e-4).all()
        torch.testing.assert_close(s, 1 - lpips_reference(feats.eval(), x, y), atol=1e-5, rtol=1e-4)
        g = net(images(2, 1, 8, 8, seed=3), images(2, 1, 8, 8, seed=4))  # tiny grayscale: upsampled inside
        assert g.shape == (2,) and torch.isfinite(g).all()


def test_lpips_wrong_state_dict(env):
    (env / "checkpoints").mkdir()
    torch.save({"features.0.weight": torch.zeros(3)}, env / "checkpoints" / "vgg16-397923af.pth")
    with pytest.raises(UserError, match="not torchvision's VGG16"):
        P.load_lpips(env)
