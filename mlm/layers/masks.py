"""Attention masks for the block levels: local window, regional, global, causal, and top-k sparse selection.

Masks are boolean with True = may attend, the convention of ``torch.nn.functional.scaled_dot_product_attention``.
Local windows follow Longformer (Beltagy et al., 2020) for text and a square patch neighbourhood (as in Swin /
neighbourhood attention) for images; regional attention lets every token see its own region in full plus the first
token of every other region, a carrier of cross-region information in the spirit of BigBird's global tokens. Top-k
selection keeps the k highest-scoring allowed keys per query (as in the top-k attention of Wang et al., 2022).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

LEVELS = ("local", "regional", "global", "routed")


def _positions(n_tokens: int, grid: tuple[int, int] | None) -> tuple[Tensor, Tensor] | Tensor:
    """Return token indices (T,) for 1-D, or (rows, cols) each (T,) for a row-major patch grid."""
    idx = torch.arange(n_tokens)
    if grid is None:
        return idx
    return idx // grid[1], idx % grid[1]


def text_pairs(kind: str, queries: Tensor, keys: Tensor, size: int, causal: bool) -> Tensor:
    """The (Q, K) mask of a 1-D ``local``/``regional``/``global`` level between query and key positions (tensors, so
    an exported graph computes it instead of storing a table); the rows and columns of :func:`level_mask`'s mask."""
    q, k = queries[:, None], keys[None, :]
    if kind == "local":
        mask = (q - k).abs() <= size
    elif kind == "regional":
        mask = (q // size == k // size) | (k % size == 0)
    else:
        mask = torch.ones_like(q - k, dtype=torch.bool)  # (Q, K)
    return mask & (k <= q) if causal else mask


def _local(n_tokens: int, grid: tuple[int, int] | None, window: int, window_2d: int) -> Tensor:
    """Allow keys within the 1-D window, or within Chebyshev distance window_2d // 2 on the grid."""
    if grid is None:
        if window < 0:
            raise ValueError(f"local window={window} must be >= 0")
        idx = _positions(n_tokens, None)
        return text_pairs("local", idx, idx, window, False)
    if window_2d < 1:
        raise ValueError(f"local window_2d={window_2d} must be >= 1")
    rows, cols = _positions(n_tokens, grid)
    dist = torch.maximum((rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs())  # (T, T)
    return dist <= window_2d // 2


def _regional(n_tokens: int, grid: tuple[int, int] | None, region: int, region_2d: int) -> Tensor:
    """Allow keys in the query's own region plus the first token of every region."""
    if grid is None:
        if region < 1:
            raise ValueError(f"region size={region} must be >= 1")
        idx = _positions(n_tokens, None)
        return text_pairs("regional", idx, idx, region, False)
    if region_2d < 1:
        raise ValueError(f"region_2d={region_2d} must be >= 1")
    rows, cols = _positions(n_tokens, grid)
    n_region_cols = -(-grid[1] // region_2d)
    region_id = (rows // region_2d) * n_region_cols + cols // region_2d
    is_first = (rows % region_2d == 0) & (cols % region_2d == 0)  # top-left patch of each block
    return (region_id[:, None] == region_id[None, :]) | is_first[None, :]


def mask_level(
    level: str, causal: bool, window: int, window_2d: int, region: int, region_2d: int
) -> tuple[str, int, int]:
    """(level, size, size_2d) a level's mask depends on: a routed level's mask is its local part (its routed tokens
    are added per input), or global attention when causal; only the sizes the level uses count."""
    if level == "routed":
        level = "global" if causal else "local"
    sizes = {"local": (window, window_2d), "regional": (region, region_2d)}.get(level, (0, 0))
    return level, *sizes


@functools.lru_cache(maxsize=256)
def _cached_mask(
    level: str, n_tokens: int, causal: bool, grid: tuple[int, int] | None, size: int, size_2d: int, device: str
) -> Tensor:
    """Build one (T, T) mask of a :func:`mask_level` level; lru_cache keeps one copy per shape and device."""
    if level == "local":
        mask = _local(n_tokens, grid, size, size_2d)
    elif level == "regional":
        mask = _regional(n_tokens, grid, size, size_2d)
    else:
        mask = torch.ones(n_tokens, n_tokens, dtype=torch.bool)
    if causal:
        mask = mask & torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
    return mask.to(device)


def level_mask(
    level: str,
    n_tokens: int,
    *,
    causal: bool,
    grid: tuple[int, int] | None,
    window: int,
    window_2d: int,
    region: int,
    region_2d: int,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Return the (T, T) boolean mask of one attention level; cached, so callers must not modify it in place."""
    if level not in LEVELS:
        raise ValueError(f"attention level {level!r} is not one of {', '.join(LEVELS)}")
    if grid is not None:
        grid = (int(grid[0]), int(grid[1]))
        if grid[0] * grid[1] != n_tokens:
            raise ValueError(f"grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} patches but n_tokens={n_tokens}")
    # Only what the mask depends on enters the cache key, so unrelated settings share one entry.
    kind, size, size_2d = mask_level(level, causal, window, window_2d, region, region_2d)
    key = (kind, n_tokens, bool(causal), grid, size, size_2d, str(torch.device(device)))
    # while torch.export / torch.compile trace, tensors are fake: caching one would hand it to later eager calls
    return _cached_mask.__wrapped__(*key) if torch.compiler.is_compiling() else _cached_mask(*key)


def top_k_mask(scores: Tensor, mask: Tensor | None, k) -> Tensor:
    """Return a boolean mask like scores (..., T, S) keeping, per query, the k best keys that mask allows.

    A query with fewer than k allowed keys keeps all of them. k may be a length schedule (an object with
    ``counts(n)``, :class:`mlm.layers.sparsity.KeepSchedule`): each query then keeps its share of the n keys it may
    see, so a causal row keeps as many in a cached decoding step as in the full pass.
    """
    if isinstance(k, int) and k < 1:
        raise ValueError(f"top-k needs k >= 1, got k={k}")
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if isinstance(k, int):
        index = scores.topk(min(k, scores.shape[-1]), dim=-1).indices  # (..., T, k)
        picked = torch.ones_like(index, dtype=torch.bool)
    else:
        allowed = (scores > float("-inf")).sum(-1, keepdim=True)  # (..., T, 1)
        per_row = k.counts(allowed)
        index = scores.topk(int(per_row.max()), dim=-1).indices
        picked = torch.arange(index.shape[-1], device=scores.device) < per_row  # the row's first per_row ranks
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, index, picked)
    return keep & (scores > float("-inf"))  # drop masked keys picked when fewer than k were allowed
