"""Rotary position embeddings: 1-D RoPE for text tokens and 2-D axial RoPE for image patches.

Follows RoFormer (Su et al., 2021) in the rotate-half layout used by LLaMA and transformers: dimension ``i`` is paired
with dimension ``i + dim/2`` and the pair is rotated by ``position * theta ** (-2i / dim)``. The 2-D variant is the
axial RoPE of "Rotary Position Embedding for Vision Transformer" (Heo et al., 2024): half of the rotated pairs follow
the patch row, the other half the patch column, so a query-key score depends only on their row and column offsets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _inv_freq(dim: int, theta: float, device: torch.device | str | None) -> Tensor:
    """Return the dim // 2 rotation frequencies theta ** (-2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rope_1d(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Return (cos, sin), each (T, dim), for token positions (T,) in the rotate-half layout."""
    if dim % 2:
        raise ValueError(f"rope dim={dim} must be even")
    freqs = positions.to(torch.float32)[:, None] * _inv_freq(dim, theta, positions.device)  # (T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim): pair i and i + dim/2 share an angle
    return emb.cos(), emb.sin()


def rope_2d(
    grid_h: int, grid_w: int, dim: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Return (cos, sin), each (grid_h * grid_w, dim), for patches in row-major order (axial: row half, column half)."""
    if dim % 4:
        raise ValueError(f"2-D rope dim={dim} must be a multiple of 4 (half the pairs per axis)")
    rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)  # (N,)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)  # (N,)
    inv_freq = _inv_freq(dim // 2, theta, device)  # (dim/4,): each axis gets a full 1-D frequency ladder
    angles = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), dim=-1)  # (N, dim/2)
    emb = torch.cat((angles, angles), dim=-1)  # (N, dim)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """Map each pair (a, b) of dims (i, i + dim/2) to (-b, a)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, dim) by the angles in cos/sin (T, dim), which broadcast over the leading dims."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
