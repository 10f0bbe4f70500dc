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

from mlm.layers.masks import mask_level


def mask_key(pattern) -> tuple:
    """What a level pattern's mask depends on: (level, queries, keys, causal, grid, sizes, start), the level and
    sizes as :func:`mlm.layers.masks.mask_level` gives them for the dense mask."""
    p = pattern
    level, *sizes = mask_level(p.level, p.causal, p.window, p.window_2d, p.region, p.region_2d)
    return level, p.n_queries, p.n_keys, p.causal, p.grid, tuple(sizes), p.start


def mask_mod(key: tuple):
    """The predicate (b, h, q_idx, kv_idx) -> bool of the dense mask a :func:`mask_key` stands for (q_idx counts
    from the pattern's start)."""
    level, _, _, causal, grid, (size, size_2d), start = key

    def allowed(q: Tensor, k: Tensor) -> Tensor:
        if level == "global":
            return k >= 0
        if grid is None and level == "local":
            return (q - k).abs() <= size
        if grid is None:
            return (q // size == k // size) | (k % size == 0)
        gw = grid[1]
        if level == "local":
            near = torch.maximum((q // gw - k // gw).abs(), (q % gw - k % gw).abs())
            return near <= size_2d // 2
        cols = -(-gw // size_2d)
        same = (q // gw // size_2d) * cols + q % gw // size_2d == (k // gw // size_2d) * cols + k % gw // size_2d
        return same | ((k // gw % size_2d == 0) & (k % gw % size_2d == 0))

    def predicate(b, h, q_idx, kv_idx):
        q = q_idx + start
        keep = allowed(q, kv_idx)
        return keep & (kv_idx <= q) if causal else keep

    return predicate


@functools.lru_cache(maxsize=64)
def _block_mask(key: tuple, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod(key), None, None, key[1], key[2], device=device)


def block_mask(pattern, device: str):
    """The FlexAttention block mask of a level pattern, one per mask and device. Building it evaluates the predicate
    at every (query, key) pair once (O(T·S) memory for that moment); the kernel then skips the masked blocks."""
    key = mask_key(pattern)
    # while torch.compile traces, tensors are fake: caching one would hand it to later eager calls
    return _block_mask.__wrapped__(key, device) if torch.compiler.is_compiling() else _block_mask(key, device)


@functools.cache
def _compiled():
    """flex_attention compiled once. Each new shape compiles its own kernel, so the recompile limit is raised from
    torch's 8 (past it torch would run the unfused reference, which builds the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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
    return run(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
