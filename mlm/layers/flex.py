"""The levels on PyTorch's FlexAttention (``model.level_impl: flex``): a block mask per shape, built once.

Routed levels keep the blocked local path plus their routed keys (their keys are chosen per input).

FlexAttention (``torch.nn.attention.flex_attention``, Dong et al., 2024) compiles the level's mask predicate into a
fused kernel that skips every key block the mask rules out, so a local window costs O(n·k) with no (T, S) scores in
memory. Each level's predicate (:func:`mask_mod`) states the dense mask of :mod:`mlm.layers.masks` position by
position; the two are tested equal. The kernel is compiled with ``torch.compile`` at the first call of each shape
(tens of seconds on a CPU). Torch has no FlexAttention backward on the CPU, so there it serves inference only; the
blocked paths of :mod:`mlm.layers.level_attention` (``sparse``) train on any device.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def mask_mod(pattern):
    """The predicate (b, h, q_idx, kv_idx) -> bool of a level pattern's dense mask (q_idx counts from its start)."""
    level, start, causal, grid = pattern.level, pattern.start, pattern.causal, pattern.grid
    if level == "routed":  # a routed level without its router scores is its local part (global when causal)
        level = "global" if causal else "local"

    def allowed(q: Tensor, k: Tensor) -> Tensor:
        if level == "global":
            return k >= 0
        if grid is None and level == "local":
            return (q - k).abs() <= pattern.window
        if grid is None:
            return (q // pattern.region == k // pattern.region) | (k % pattern.region == 0)
        gw = grid[1]
        if level == "local":
            near = torch.maximum((q // gw - k // gw).abs(), (q % gw - k % gw).abs())
            return near <= pattern.window_2d // 2
        s, cols = pattern.region_2d, -(-gw // pattern.region_2d)
        same = (q // gw // s) * cols + q % gw // s == (k // gw // s) * cols + k % gw // s
        return same | ((k // gw % s == 0) & (k % gw % s == 0))

    def predicate(b, h, q_idx, kv_idx):
        q = q_idx + start
        keep = allowed(q, kv_idx)
        return keep & (kv_idx <= q) if causal else keep

    return predicate


@functools.lru_cache(maxsize=64)
def block_mask(pattern, device: str):
    """The FlexAttention block mask of a level pattern, one per pattern and device."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod(pattern), None, None, pattern.n_queries, pattern.n_keys, device=device)


@functools.cache
def _compiled():
    """flex_attention compiled once (each new shape still compiles its own kernel)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, pattern, scale: float, compiled: bool = True) -> Tensor:
    """Attention of q (B, H, T, Dk) over k (B, Hk, S, Dk), v (B, Hk, S, Dv) under a level pattern, on FlexAttention.

    compiled=False runs torch's unfused reference of the same kernel (it builds the scores: for tests).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f"model.level_impl=flex: torch {torch.__version__} has no FlexAttention backward on the "
                         "CPU; train with model.level_impl=sparse (or auto) and use flex for inference")  # fmt: skip
    if q.device.type == "cpu":  # torch refuses inputs that require grad there, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    mask = block_mask(pattern, str(q.device))
    run = _compiled() if compiled and not torch.compiler.is_compiling() else flex_attention
    gqa = k.shape[1] != q.shape[1]
    return run(q, k.contiguous(), v.contiguous(), block_mask=mask, scale=scale, enable_gqa=gqa)
