import math

import pytest
import torch

from mucs.augment import AugmentPipe

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def images(n=16, c=3, res=8, seed=0):
    return torch.rand(n, c, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def ramp(n, res):
    """f(x, y) = x (columns) in channel 0 and y (rows) in channel 1, centred pixel coordinates."""
    r = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    return torch.stack([r[None, :].expand(res, res), r[:, None].expand(res, res)])[None].repeat(n, 1, 1, 1)


def test_p0_is_identity_with_zero_labels():
    x = images()
    out, labels = AugmentPipe(p=0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    assert labels.shape == (16, 9) and torch.equal(labels, torch.zeros(16, 9))


def test_same_generator_same_output():
    x = images(64, res=32)
    pipe = AugmentPipe(p=0.5)
    a = pipe(x, torch.Generator().manual_seed(3))
    b = pipe(x, torch.Generator().manual_seed(3))
    c = pipe(x, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_xflip_only():
    x = images(64)
    out, labels = AugmentPipe(p=1, **{**OFF, "xflip": 1})(x, torch.Generator().manual_seed(0))
    f = labels[:, 0] == 1
    assert 0 < f.sum() < 64  # a fair coin per image
    assert torch.equal(out[f], torch.flip(x[f], dims=[3]))
    assert torch.equal(out[~f], x[~f])
    assert torch.equal(labels[:, 1:], torch.zeros(64, 8)) and set(labels[:, 0].tolist()) == {0.0, 1.0}


def test_yflip_only():
    x = images(64)
    out, labels = AugmentPipe(p=1, **{**OFF, "yflip": 1})(x, torch.Generator().manual_seed(0))
    f = labels[:, 1] == 1
    assert 0 < f.sum() < 64
    assert torch.equal(out[f], torch.flip(x[f], dims=[2]))
    assert torch.equal(out[~f], x[~f])


def test_default_pipe_finite_in_range_and_untouched_images_exact():
    x = images(256, res=8)
    out, labels = AugmentPipe()(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and labels.shape == (256, 9)
    assert torch.isfinite(out).all() and torch.isfinite(labels).all()
    assert out.abs().max() <= 1 + 1e-6  # bilinear + reflection stays in the convex hull of the pixels
    untouched = (labels == 0).all(dim=1)
    assert untouched.any() and torch.equal(out[untouched], x[untouched])
    assert (~untouched).any() and not torch.equal(out[~untouched], x[~untouched])
    # xflip=1e8 means every image flips a fair coin, whatever p
    assert 0.3 < (labels[:, 0] == 1).float().mean() < 0.7


def test_translation_moves_content_by_label():
    res, pipe = 16, AugmentPipe(p=1, **{**OFF, "translate_frac": 1})
    out, labels = pipe(ramp(8, res), torch.Generator().manual_seed(0))
    t = labels[:, 7:9] * res * pipe.translate_frac_std  # shift in pixels (x, y)
    c = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    for i in range(8):
        ok = (c - t[i, 0]).abs() <= (res - 1) / 2  # sampled inside the image: no reflection involved
        assert torch.allclose(out[i, 0, :, ok], (c - t[i, 0])[ok].expand(res, -1), atol=1e-4)  # out(x) = in(x - t)
        ok = (c - t[i, 1]).abs() <= (res - 1) / 2
        assert torch.allclose(out[i, 1, ok, :], (c - t[i, 1])[ok, None].expand(-1, res), atol=1e-4)


def test_scale_and_rotation_follow_labels():
    res = 32
    c = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
    X, Y = c[None, :].expand(res, res), c[:, None].expand(res, res)
    centre = (X.abs() <= 3) & (Y.abs() <= 3)  # stays inside the image for the sampled transforms

    pipe = AugmentPipe(p=1, **{**OFF, "scale": 1})
    out, labels = pipe(ramp(8, res), torch.Generator().manual_seed(0))
    for i in range(8):
        s = 2 ** (pipe.scale_std * labels[i, 2])
        assert torch.allclose(out[i, 0][centre], (X / s)[centre], atol=1e-4)  # out(p) = in(p / s)

    pipe = AugmentPipe(p=1, **{**OFF, "rotate_frac": 1})
    out, labels = pipe(ramp(8, res), torch.Generator().manual_seed(0))
    for i in range(8):
        cos, sin = labels[i, 3] + 1, labels[i, 4]
        assert abs(cos ** 2 + sin ** 2 - 1) < 1e-5
        assert torch.allclose(out[i, 0][centre], (cos * X - sin * Y)[centre], atol=1e-3)  # out(p) = in(R p)
        assert torch.allclose(out[i, 1][centre], (sin * X + cos * Y)[centre], atol=1e-3)


def test_aniso_preserves_area_at_centre():
    res = 32
    pipe = AugmentPipe(p=1, **{**OFF, "aniso": 1})
    out, labels = pipe(ramp(8, res), torch.Generator().manual_seed(0))
    assert (labels[:, [0, 1, 2, 3, 4, 7, 8]] == 0).all() and (labels[:, 5:7] != 0).any()
    # the sampled map is linear with determinant 1: check on the Jacobian at the centre
    m = res // 2
    for i in range(8):
        J = torch.stack([(out[i, :, m - 1, m] - out[i, :, m - 2, m]), (out[i, :, m, m - 1] - out[i, :, m, m - 2])])
        assert abs(torch.linalg.det(J).abs() - 1) < 1e-3


def test_works_at_8px_grayscale():
    out, labels = AugmentPipe(p=1)(images(8, c=1, res=8), torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 8, 8) and labels.shape == (8, 9) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = images(32, res=32)
    pipe = AugmentPipe(p=0.5)
    a, la = pipe(x, torch.Generator().manual_seed(0))
    b, lb = pipe(x.cuda(), torch.Generator().manual_seed(0))
    assert b.is_cuda and torch.equal(la, lb.cpu())
    assert torch.allclose(a, b.cpu(), atol=1e-5)
    c, _ = pipe(x.cuda(), torch.Generator().manual_seed(0))
    assert torch.equal(b, c)
