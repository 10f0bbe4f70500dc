"""Regional attention without the dense mask: each query sees its own region plus the first token of every other.

Tokens are laid out region by region (1-D: runs of ``region`` tokens; 2-D: square blocks of the patch grid, top-left
patch first), and one softmax runs over two score blocks: the own region (n·R scores) and the other regions' first
tokens (n·n/R). :mod:`mlm.layers.level_attention` calls it for long sequences; the dense mask of
:func:`mlm.layers.masks.level_mask` is the reference it is tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _slots(order: Tensor, n_tokens: int) -> Tensor:
    """(T,) the region slot of each token, inverting order (padding slots, = n_tokens, are never read back)."""
    slots = torch.empty(n_tokens + 1, dtype=torch.long).scatter_(0, order, torch.arange(order.numel()))
    return slots[:n_tokens]


@functools.lru_cache(maxsize=64)
def _regions_1d(t: int, region: int, causal: bool, device: str) -> tuple[Tensor, ...]:
    """Region layout of 1-D regional attention; see :func:`_region_attend` for the tensors."""
    m = -(-t // region)
    slot_pos = torch.arange(m * region).view(m, region)  # token position of each slot
    valid = slot_pos < t
    own_ok = valid[:, None, :].expand(m, region, region)  # key slot on the sequence, (m, R, R)
    if causal:
        own_ok = own_ok & (slot_pos[:, None, :] <= slot_pos[:, :, None])
    first = torch.arange(0, t, region)
    sum_ok = torch.arange(m)[None, :] != torch.arange(m)[:, None]  # (m, m): not the own region's first token
    sum_ok = sum_ok[:, None, :].expand(m, region, m)
    if causal:
        sum_ok = sum_ok & (first[None, None, :] <= slot_pos[:, :, None])
    order = torch.where(valid, slot_pos, t).reshape(-1)
    own_ok = own_ok | ~valid[:, :, None]  # padded query rows: anything finite, dropped afterwards
    return tuple(x.to(device) for x in (order, own_ok, sum_ok, first, _slots(order, t)))


@functools.lru_cache(maxsize=64)
def _regions_2d(grid: tuple[int, int], size: int, device: str) -> tuple[Tensor, ...]:
    """Region layout of 2-D regional attention (square regions of the row-major grid, top-left patch first)."""
    gh, gw = grid
    mr, mc = -(-gh // size), -(-gw // size)
    r = torch.arange(mr)[:, None, None, None] * size + torch.arange(size)[None, None, :, None]  # (mr, 1, s, 1)
    c = torch.arange(mc)[None, :, None, None] * size + torch.arange(size)[None, None, None, :]  # (1, mc, 1, s)
    valid = ((r < gh) & (c < gw)).reshape(mr * mc, size * size)  # (m, R²)
    order = torch.where(valid, (r * gw + c).reshape(mr * mc, size * size), gh * gw).reshape(-1)
    own_ok = valid[:, None, :] | ~valid[:, :, None]  # padded query rows: anything finite, dropped afterwards
    m = mr * mc
    first = order.view(m, -1)[:, 0]  # a region's top-left patch is always on the grid
    sum_ok = (torch.arange(m)[None, :] != torch.arange(m)[:, None])[:, None, :].expand(m, size * size, m)
    return tuple(x.to(device) for x in (order, own_ok, sum_ok, first, _slots(order, gh * gw)))


def _region_attend(q, k, v, order, own_ok, sum_ok, first, slots, scale) -> Tensor:
    """One softmax over each query's own region and the other regions' first tokens.

    order (m * R,) lists the token in each region slot (n = a zero padding token); own_ok (m, R, R) and sum_ok
    (m, R, m) say which own-region slots and which region firsts each slot's query may see; slots (T,) is each
    token's slot.
    """
    b, h, t, _ = q.shape
    m, r = own_ok.shape[:2]

    def regions(x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, m, R, D) in region order
        return F.pad(x, (0, 0, 0, 1))[:, :, order].view(b, h, m, r, x.shape[-1])

    qr, kr, vr = regions(q), regions(k), regions(v)
    own = (qr @ kr.transpose(-1, -2)) * scale  # (B, H, m, R, R)
    summary = (qr @ k[:, :, first].transpose(-1, -2)[:, :, None]) * scale  # (B, H, m, R, m)
    neg = float("-inf")
    weights = torch.cat((own.masked_fill(~own_ok, neg), summary.masked_fill(~sum_ok, neg)), dim=-1).softmax(-1)
    out = weights[..., :r] @ vr + weights[..., r:] @ v[:, :, first][:, :, None]  # (B, H, m, R, Dv)
    out = out.reshape(b, h, m * r, -1)
    return out[:, :, slots]


def regional_1d(q: Tensor, k: Tensor, v: Tensor, region: int, causal: bool, scale: float) -> Tensor:
    """Attention within 1-D regions of ``region`` tokens plus to every other region's first token."""
    return _region_attend(q, k, v, *_regions_1d(q.shape[2], region, causal, str(q.device)), scale)


def regional_2d(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], size: int, scale: float) -> Tensor:
    """Attention within square regions of the patch grid plus to every other region's top-left patch."""
    return _region_attend(q, k, v, *_regions_2d(tuple(grid), size, str(q.device)), scale)
