"""EDM's non-leaking geometric augmentation (Karras et al. 2022, App. F.2; after StyleGAN2-ADA's AugmentPipe).

Each image gets, each with probability (multiplier * p): an x-flip and a y-flip (each a fair coin when
chosen), isotropic scaling 2^(0.2 w), a rotation by w ~ U(-pi, pi) * rotate_frac_max, anisotropic scaling
2^(0.2 w) along a random axis, and a translation by 0.125 * (W, H) * w. The network is told what was done
through a 9-dim label, so it can learn the augmented distribution without it leaking into samples
(sampling uses the zero label):

    [xflip, yflip, scale w, cos(rot) - 1, sin(rot), aniso w cos(r), aniso w sin(r), translate wx, wy]

It is all zeros for an image left untouched. The layout is fixed: a disabled augmentation keeps its
column(s) at zero (EDM drops them instead), so the network's augment_dim is always 9.

Simplification (honest): EDM resamples through a 2x sym6-wavelet upsample, a bilinear grid_sample with zero
padding inside a reflect-padded margin, and a wavelet downsample, to limit aliasing. Here the composed
affine map is applied in one bilinear `grid_sample` at the native resolution with reflection padding.
Same maths for the transform and the labels; a little more aliasing. EDM's integer translation, integer
rotation and colour augmentations are left out (the CIFAR-10 setup does not use them).

Determinism: every random number is drawn, in a fixed order and whatever is enabled, from the given
torch.Generator on its own device (the CPU default generator when None), so a rerun with the same seed is
bit-identical and the parameters do not depend on the device the images live on.
"""
import math

import torch
import torch.nn.functional as F_


def _affine(a, b, c, d, tx, ty):
    """Batch of 3x3 homogeneous matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from [N] tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=1).reshape(-1, 3, 3)


def scale2d(sx, sy):
    zero = torch.zeros_like(sx)
    return _affine(sx, zero, zero, sy, zero, zero)


def rotate2d(theta):
    zero = torch.zeros_like(theta)
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), zero, zero)


def translate2d(tx, ty):
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return _affine(one, zero, zero, one, tx, ty)


class AugmentPipe:
    """Defaults are EDM's CIFAR-10 settings (`--augment=0.12`); the UNet/VP jobs use p=0.1."""

    label_dim = 9

    def __init__(self, p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                 scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125):
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max, self.aniso_std = float(scale_std), float(rotate_frac_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_frac_std = float(aniso_rotate_prob), float(translate_frac_std)

    def __call__(self, images, generator=None):
        N, C, H, W = images.shape
        dev = generator.device if generator is not None else torch.device("cpu")
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev, dtype=torch.float32)
        randn = lambda *shape: torch.randn(*shape, generator=generator, device=dev, dtype=torch.float32)
        coin = lambda *shape: torch.randint(2, shape, generator=generator, device=dev).float()
        chosen = lambda mult, *shape: rand(*shape) < mult * self.p  # does this augmentation fire?

        # Draw everything first, in a fixed order.
        fx = coin(N) * chosen(self.xflip, N)
        fy = coin(N) * chosen(self.yflip, N)
        w_scale = randn(N) * chosen(self.scale, N)
        w_rot = (rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max) * chosen(self.rotate_frac, N)
        w_aniso, r_aniso = randn(N), (rand(N) * 2 - 1) * math.pi
        w_aniso = w_aniso * chosen(self.aniso, N)
        r_aniso = r_aniso * (rand(N) < self.aniso_rotate_prob)  # else scale along the image axes
        w_tr = randn(2, N) * chosen(self.translate_frac, N)

        labels = torch.stack([fx, fy, w_scale, w_rot.cos() - 1, w_rot.sin(), w_aniso * r_aniso.cos(),
                              w_aniso * r_aniso.sin(), w_tr[0], w_tr[1]], dim=1)

        # Pixel blitting: exact flips.
        images = torch.where(fx.to(images.device)[:, None, None, None] == 1, images.flip(3), images)
        images = torch.where(fy.to(images.device)[:, None, None, None] == 1, images.flip(2), images)

        # G_inv maps output pixel coordinates (origin at the image centre) to input ones: the inverse of
        # scale, then rotate, then aniso, then translate.
        s = (w_scale * self.scale_std).exp2()
        a = (w_aniso * self.aniso_std).exp2()
        G_inv = scale2d(1 / s, 1 / s) @ rotate2d(w_rot)
        G_inv = G_inv @ rotate2d(-r_aniso) @ scale2d(1 / a, a) @ rotate2d(r_aniso)
        G_inv = G_inv @ translate2d(-w_tr[0] * W * self.translate_frac_std, -w_tr[1] * H * self.translate_frac_std)

        moved = (labels[:, 2:] != 0).any(dim=1)  # only these need resampling; the rest stay bit-exact
        if moved.any():
            # align_corners=False: normalised coordinate = 2 * centred pixel coordinate / size
            S = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], device=dev))
            theta = (S @ G_inv[moved] @ torch.linalg.inv(S))[:, :2].to(images.device, images.dtype)
            idx = moved.nonzero().flatten().to(images.device)
            sub = images[idx]
            grid = F_.affine_grid(theta, list(sub.shape), align_corners=False)
            sub = F_.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            images = images.index_copy(0, idx, sub)
        return images, labels.to(images.device)
