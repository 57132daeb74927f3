import math

import pytest
import torch

from mucs.nets import build_net
from mucs.nets.unet import SongUNet

TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def wake(net, seed=0):
    """Give the near-zero output layers (conv1, attn.proj, aux_conv) O(1) weights, as after training,
    so that comparisons between outputs are not lost in the 1e-5 init scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if any(k in name for k in ("conv1.", "attn.proj.", "aux_conv.")) and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return net


def tiny(label_dim=0, augment_dim=0, res=8, channels=1, **kw):
    torch.manual_seed(0)
    return wake(SongUNet(res, channels, channels, label_dim=label_dim, augment_dim=augment_dim, **{**TINY, **kw}))


@pytest.mark.parametrize("channels, published", [(128, 55.7e6), (192, 125e6)])
def test_published_parameter_counts(channels, published):
    # unet_edm / unet_vp: 32x32 RGB, unconditional, augment_dim 9, mult (2,2,2), 4 blocks, attention at 16x16
    with torch.device("meta"):
        net = SongUNet(32, 3, 3, augment_dim=9, model_channels=channels)
    assert abs(n_params(net) / published - 1) < 0.05, n_params(net)


def test_exact_layout_regression():
    # Measured once; the layer-for-layer EDM layout gives exactly these (EDM reports 55.73 M for DDPM++ CIFAR-10).
    # A change of block structure or embedding width that hides inside the 5% above shows up here.
    with torch.device("meta"):
        assert n_params(SongUNet(32, 3, 3, augment_dim=9)) == 55_733_891
        assert n_params(SongUNet(32, 3, 3, augment_dim=9, model_channels=192)) == 125_330_883
    net = tiny(label_dim=10, augment_dim=9)
    assert net.map_label.weight.shape == (16, 10) and net.map_augment.weight.shape == (16, 9)
    assert net.map_layer0.weight.shape == (64, 16) and net.map_layer1.weight.shape == (64, 64)  # emb = 4 * 16
    assert net.enc["4x4_block0"].affine.weight.shape == (32, 64)


def test_blocks_see_silu_embedding():
    net = tiny(label_dim=10).eval()
    seen = []
    net.enc["8x8_block0"].affine.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    net(torch.randn(64, 1, 8, 8), torch.randn(64) * 3, torch.eye(10)[torch.arange(64) % 10])
    emb = seen[0]
    assert emb.shape == (64, 64)
    assert emb.min() >= -0.2785 and (emb > 0).any()  # SiLU(z) >= -0.2785


def test_published_config_runs_at_32px():
    net = SongUNet(32, 3, 3, augment_dim=9).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([0.3]), None, torch.zeros(1, 9))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # near-zero output init (EDM): the untrained network starts close to F = 0
    assert out.abs().max() < 1e-2


@pytest.mark.parametrize("res, mult, attn", [(8, (1, 2), (4,)), (32, (1, 2, 2), (16,)), (64, (1, 2, 2, 2), (16,))])
def test_output_shapes(res, mult, attn):
    net = SongUNet(res, 3, 2, label_dim=4, augment_dim=9, model_channels=16, channel_mult=mult, num_blocks=1,
                   attn_resolutions=attn).eval()
    x = torch.randn(2, 3, res, res)
    out = net(x, torch.randn(2), torch.eye(4)[:2], torch.zeros(2, 9))
    assert out.shape == (2, 2, res, res)
    assert torch.isfinite(out).all()
    # attention really is where it was asked for
    assert any(f"enc.{attn[0]}x{attn[0]}_block0.attn.qkv" in k for k, _ in net.named_parameters())


def test_parameter_names():
    names = {k for k, _ in tiny(label_dim=10, augment_dim=9).named_parameters()}
    for k in ["map_label.weight", "map_augment.weight", "map_layer0.weight", "map_layer1.bias", "enc.8x8_conv.weight",
              "enc.8x8_block0.affine.weight", "enc.4x4_down.skip.weight", "enc.4x4_block0.attn.qkv.weight",
              "dec.4x4_in0.attn.proj.weight", "dec.8x8_up.conv0.weight", "dec.8x8_block1.norm1.weight",
              "dec.8x8_aux_norm.weight", "dec.8x8_aux_conv.weight"]:
        assert k in names, k
    assert "map_label.bias" not in names and "map_augment.bias" not in names  # a zero row adds nothing


def test_conditional_vs_unconditional():
    net = tiny(label_dim=10).eval()
    x, c = torch.randn(3, 1, 8, 8), torch.full([3], 0.5)
    y = torch.eye(10)[[1, 2, 2]]
    out = net(x, c, y)  # the class changes the output of every image
    out_swapped = net(x, c, torch.eye(10)[[2, 1, 1]])
    assert (out - out_swapped).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # a zero row is "unconditional", and class_labels=None means the same
    assert torch.equal(net(x, c, torch.zeros(3, 10)), net(x, c, None))
    assert not torch.allclose(net(x, c, None), out, atol=1e-4)


def test_label_dropout_drops_to_unconditional():
    net = tiny(label_dim=10, label_dropout=1.0)
    net.train()
    net.enc.apply(lambda m: setattr(m, "dropout", 0.0) if hasattr(m, "dropout") else None)
    net.dec.apply(lambda m: setattr(m, "dropout", 0.0) if hasattr(m, "dropout") else None)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert torch.equal(net(x, c, torch.eye(10)[:2]), net(x, c, None))


def test_noise_and_augment_labels_matter():
    net = tiny(augment_dim=9).eval()
    x = torch.randn(2, 1, 8, 8)
    base = net(x, torch.zeros(2), None, torch.zeros(2, 9))
    assert torch.equal(base, net(x, torch.zeros(2), None, None))  # None augment label == zeros
    assert (base - net(x, torch.ones(2), None, torch.zeros(2, 9))).abs().max() > 1e-4
    assert (base - net(x, torch.zeros(2), None, torch.ones(2, 9))).abs().max() > 1e-4


def test_gradient_flows_to_every_parameter():
    net = tiny(label_dim=10, augment_dim=9)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    out = net(x, torch.randn(4), torch.eye(10)[:4], torch.randn(4, 9))
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_deterministic_with_fixed_seed():
    def run():
        net = tiny(label_dim=10, augment_dim=9).train()  # dropout on
        torch.manual_seed(1)
        return net(torch.ones(2, 1, 8, 8), torch.zeros(2), torch.eye(10)[:2], torch.zeros(2, 9))

    assert torch.equal(run(), run())
    net = tiny().eval()  # eval: no dropout, repeated calls agree
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, torch.zeros(2)), net(x, torch.zeros(2)))


def test_registry_builds_unet():
    net = build_net("unet", TINY, img_resolution=8, in_channels=1, out_channels=1)
    assert isinstance(net, SongUNet)


def test_residual_scaling_sqrt_half():
    # EDM's skip_scale: (F(x) + skip(x)) / sqrt(2) per residual, and again around attention
    block = tiny().enc["4x4_block0"].eval()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 64)
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        with_attn = block(x, emb)
        block.attn = None
        assert torch.allclose(with_attn, block(x, emb) * math.sqrt(0.5), atol=1e-6)
        block.conv1.weight.zero_()
        block.conv1.bias.zero_()
        assert torch.allclose(block(x, emb), block.skip(x) * math.sqrt(0.5), atol=1e-6)
