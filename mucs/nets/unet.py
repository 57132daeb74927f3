"""DDPM++ UNet raw network F(x, c_noise, y, aug): the architecture of EDM's `SongUNet` (Karras et al. 2022,
after Song et al. 2021) in its DDPM++ setting: positional noise embedding, standard encoder and decoder,
[1, 1] resampling filter (2x2 average pooling down, nearest-neighbour up), one attention head,
skip scale sqrt(1/2), GroupNorm eps 1e-6, xavier-uniform init with near-zero output layers.

Parameter names (used by attribution methods to choose what to freeze):
  map_noise          sinusoidal noise-level embedding (no parameters)
  map_label.*        class / text condition -> embedding (bias-free, so a zero row adds nothing)
  map_augment.*      augmentation label -> embedding (bias-free)
  map_layer0.*, map_layer1.*   the embedding MLP
  enc.{r}x{r}_conv.*           first 3x3 conv          enc.{r}x{r}_down.*   downsampling block
  enc.{r}x{r}_block{i}.*       encoder blocks          dec.{r}x{r}_in0/in1  bottleneck blocks
  dec.{r}x{r}_up.*             upsampling block        dec.{r}x{r}_block{i}.* decoder blocks
  dec.{r}x{r}_aux_norm.*, dec.{r}x{r}_aux_conv.*   output GroupNorm and 3x3 conv
  inside a block:  norm0, conv0, affine, norm1, conv1, skip, attn.norm, attn.qkv, attn.proj
"""
import math

import torch
from torch import nn
import torch.nn.functional as F_


def _init(layer, scale=1.0):
    """EDM's 'xavier_uniform' init scaled by `scale`, zero bias."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels):
    # EDM: 32 groups, but at least 4 channels per group (matters for the tiny configs)
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class PositionalEmbedding(nn.Module):
    """[sin, cos] of c_noise at frequencies (1/10000)^(i/(n/2-1)), EDM's positional embedding with endpoint=True."""

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
        x = x.float().ger(freqs)
        return torch.cat([x.sin(), x.cos()], dim=1)  # EDM swaps its [cos, sin] to this order


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels, added residually by the block."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = _init(nn.Conv2d(channels, 3 * channels, 1), math.sqrt(0.2))
        self.proj = _init(nn.Conv2d(channels, channels, 1), 1e-5)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # [B, 1, HW, C]
        a = F_.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)  # softmax(q k^T / sqrt(C)) v
        return self.proj(a.transpose(-1, -2).reshape(B, C, H, W))


class UNetBlock(nn.Module):
    """Pre-activation residual block with an additive embedding (EDM's UNetBlock, adaptive_scale=False)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down, self.dropout = in_channels, out_channels, up, down, dropout
        self.norm0 = group_norm(in_channels)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, out_channels))
        self.norm1 = group_norm(out_channels)
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), 1e-5)
        # 1x1 projection whenever the shape changes (EDM's resample_proj=True)
        self.skip = _init(nn.Conv2d(in_channels, out_channels, 1)) if (in_channels != out_channels or up or down) else None
        self.attn = SelfAttention(out_channels) if attention else None

    def resample(self, x):
        # the [1, 1] filter of DDPM++: box filter down, nearest-neighbour up
        if self.down:
            return F_.avg_pool2d(x, 2)
        if self.up:
            return F_.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        orig = x
        x = self.conv0(self.resample(F_.silu(self.norm0(x))))
        x = F_.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
        x = self.conv1(F_.dropout(x, p=self.dropout, training=self.training))
        skip = self.resample(orig)
        x = (x + (self.skip(skip) if self.skip is not None else skip)) * math.sqrt(0.5)
        if self.attn is not None:
            x = (x + self.attn(x)) * math.sqrt(0.5)
        return x


class SongUNet(nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0.0):
        super().__init__()
        assert img_resolution % 2 ** (len(channel_mult) - 1) == 0, "resolution must halve cleanly at every level"
        self.label_dim, self.label_dropout = label_dim, label_dropout
        noise_channels, emb_channels = model_channels, model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, dropout=dropout)

        # Mapping: c_noise (+ label + augmentation) -> emb.
        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_label = _init(nn.Linear(label_dim, noise_channels, bias=False)) if label_dim else None
        self.map_augment = _init(nn.Linear(augment_dim, noise_channels, bias=False)) if augment_dim else None
        self.map_layer0 = _init(nn.Linear(noise_channels, emb_channels))
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels))

        # Encoder: every module's output is kept as a skip connection.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = _init(nn.Conv2d(cin, cout, 3, padding=1))
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: each block takes the concatenation with one skip.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = group_norm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = _init(nn.Conv2d(cout, out_channels, 3, padding=1), 1e-5)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels.reshape(-1)).to(x.dtype)
        if self.map_label is not None and class_labels is not None:
            y = class_labels.to(x.dtype).reshape(len(x), self.label_dim)
            if self.training and self.label_dropout:
                y = y * (torch.rand([len(x), 1], device=x.device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.map_label(y * math.sqrt(self.label_dim))  # sqrt(dim): unit-variance entries for one-hot
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(x.dtype))
        emb = F_.silu(self.map_layer1(F_.silu(self.map_layer0(emb))))

        skips = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)
        for name, m in self.dec.items():
            if name.endswith("aux_norm"):
                x = F_.silu(m(x))
            elif name.endswith("aux_conv"):
                x = m(x)
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return x
