"""A DiT (Peebles & Xie 2023) raw network F(x, c_noise, y, aug) for the preconditioners in mucs.diffusion.

Shape of the published `dit_edm`: a small conv front end, patch embedding (patch 2), fixed sin-cos 2D
positions, extra learnable tokens, N blocks of self-attention + MLP with adaLN-zero conditioning on
c = SiLU(emb(c_noise) + emb(y) + emb(aug)).

Parameter names (used by attribution methods to choose what to freeze):
  front.*            conv front end              patch.*        patch embedding
  pos                fixed positions (buffer)    extra_tokens   learnable extra tokens
  map_noise.*        noise-level embedder        map_label.*    condition-embedder MLP
  map_augment.*      augmentation-label embedder
  blocks.i.attn.qkv / attn.proj                  blocks.i.mlp.fc1 / mlp.fc2
  blocks.i.adaLN.*   modulation                  final.adaLN / final.linear
"""
import math

import torch
from torch import nn
import torch.nn.functional as F_


def sincos_2d(width, grid):
    """Fixed 2D sin-cos position embedding [grid*grid, width] (as in MAE / DiT)."""
    assert width % 4 == 0
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    out = [f(c.flatten()[:, None] * omega[None]) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (the noise level c_noise), as EDM's `PositionalEmbedding`."""

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x):
        freqs = torch.arange(self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (self.num_channels // 2))
        x = x.float().ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F_.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width, ratio, dropout):
        super().__init__()
        self.fc1 = nn.Linear(width, int(width * ratio))
        self.fc2 = nn.Linear(int(width * ratio), width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(F_.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero: (shift, scale, gate) for attention and for the MLP."""

    def __init__(self, width, heads, mlp_ratio, cond_width, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio, dropout)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 6 * width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, c):
        sa, ca, ga, sm, cm, gm = self.adaLN(c).chunk(6, dim=1)
        x = x + ga[:, None] * self.drop(self.attn(modulate(self.norm1(x), sa, ca)))
        return x + gm[:, None] * self.drop(self.mlp(modulate(self.norm2(x), sm, cm)))


class FinalLayer(nn.Module):
    def __init__(self, width, patch, out_channels, cond_width):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 2 * width))
        self.linear = nn.Linear(width, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, patch=2, width=768,
                 depth=12, heads=12, mlp_ratio=4.0, cond_width=256, extra_tokens=32, front_channels=64,
                 dropout=0.1, noise_channels=256):
        super().__init__()
        assert img_resolution % patch == 0, "image size must be a multiple of the patch size"
        self.patch, self.out_channels, self.grid = patch, out_channels, img_resolution // patch
        self.front = nn.Sequential(nn.Conv2d(in_channels, front_channels, 3, padding=1), nn.SiLU())
        self.patch_embed = nn.Conv2d(front_channels, width, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(width, self.grid)[None], persistent=False)
        self.extra_tokens = nn.Parameter(torch.randn(1, extra_tokens, width) * 0.02) if extra_tokens else None
        self.map_noise = nn.Sequential(PositionalEmbedding(noise_channels), nn.Linear(noise_channels, cond_width),
                                       nn.SiLU(), nn.Linear(cond_width, cond_width))
        self.map_label = nn.Sequential(nn.Linear(label_dim, cond_width), nn.SiLU(),
                                       nn.Linear(cond_width, cond_width)) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, cond_width, bias=False) if augment_dim else None
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, cond_width, dropout) for _ in range(depth))
        self.final = FinalLayer(width, patch, out_channels, cond_width)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # adaLN-zero: every block starts as the identity and the output as zero
        for layer in [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        c = self.map_noise(noise_labels)
        if self.map_label is not None and class_labels is not None:
            c = c + self.map_label(class_labels.to(c.dtype))
        if self.map_augment is not None and augment_labels is not None:
            c = c + self.map_augment(augment_labels.to(c.dtype))
        h = self.patch_embed(self.front(x)).flatten(2).transpose(1, 2) + self.pos  # [B, T, width]
        n_extra = 0
        if self.extra_tokens is not None:
            n_extra = self.extra_tokens.shape[1]
            h = torch.cat([self.extra_tokens.expand(len(h), -1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h[:, n_extra:], c)  # [B, T, p*p*C]
        p, g, C = self.patch, self.grid, self.out_channels
        return h.reshape(len(h), g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(len(h), C, g * p, g * p)
