"""The LLaVA-Mini pieces that are not Llama: the compressor (resampler) and the projector.

Parameter names match the reference checkpoints (`model.compressor.*`, `model.mm_projector.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(p·ω), cos(p·ω)] with ω_i = 10000^(-i/(dim/2)), computed in float32 as the MAE recipe does."""
    if dim % 2:
        raise ValueError("sin-cos embedding width must be even")
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    angles = positions.reshape(-1).to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid², dim) table; the first half encodes the column index, the second the row (MAE's layout)."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def resize_pos_table(table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubic resize of a square (g², C) table to a (√num_tokens)² grid, in float32."""
    src, dst = int(math.isqrt(table.shape[0])), int(math.isqrt(num_tokens))
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class Compressor(nn.Module):
    """Cross-attention of `size²` learnable queries over a frame's patch features (→ `size²` tokens).

    Queries: LayerNorm(query) + pos; keys: LayerNorm(x) + pos resized to x's grid; values: LayerNorm(x).
    `pos_embed` is stored in checkpoints and the stored table is what is used.
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.randn(grid_size**2, embed_dim) * 0.02)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch features → (B, size², C) compressed tokens."""
        kv = self.ln_kv(features)
        key_pos = resize_pos_table(self.pos_embed, features.shape[1]).to(kv.dtype)
        queries = (self.ln_q(self.query) + self.pos_embed.to(kv.dtype)).unsqueeze(0)
        queries = queries.expand(features.shape[0], -1, -1)
        out, _ = self.attn(queries, kv + key_pos.unsqueeze(0), kv, need_weights=False)
        return out


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear`, `identity`, or `mlpNx_gelu` (Linear, then N-1 × (GELU, Linear)), as the reference names them."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        return nn.Identity()
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = int(kind[3:-6])
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector type {kind!r}")
