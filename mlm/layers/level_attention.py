"""Level attention that skips masked work: the same function as a dense level mask, at O(n·k) instead of O(n²).

A :class:`LevelPattern` describes one block's mask (level, causal, grid, sizes, first query position) without
building it. :func:`pattern_attend` runs it on the fast path when the sequence is long enough to pay off, else on the
dense boolean mask of :func:`mlm.layers.masks.level_mask`, which stays the reference every fast path is tested against:

- local, 1-D: query blocks of ``window`` tokens each attend to a band of keys cut from the padded key sequence by
  ``unfold`` (a view, as in Longformer's chunked implementation); cost n·3w;
- local, 2-D: b×b query tiles each attend to the (b+2r)² key tile around them (neighbourhood attention);
  cost n·(b+2r)²/b²;
- regional: attention within the region plus to the first token of every other region, two score blocks under one
  softmax (:mod:`mlm.layers.regional`); cost n·(R + n/R);
- global: SDPA with no mask, or ``is_causal`` (both take fused kernels; an explicit mask does not on CPU).

In training the local paths keep no scores for backward (:mod:`mlm.layers.blocked` recomputes them).

``impl="flex"`` runs local, regional and global levels on FlexAttention instead (:mod:`mlm.layers.flex`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mlm.layers.blocked import blocked_attention
from mlm.layers.flex import flex_attend
from mlm.layers.masks import LEVELS, level_mask
from mlm.layers.regional import regional_1d, regional_2d

IMPLS = ("auto", "dense", "sparse", "flex")  # flex: FlexAttention (inference only on the CPU)
AUTO_MIN_TOKENS = 256  # below this the dense mask is as fast (bench scale: the fast paths win from a few hundred)


@dataclass(frozen=True)
class LevelPattern:
    """The mask of one attention level over queries start..start+T-1 and keys 0..start+T-1, not yet built."""

    level: str
    n_queries: int
    causal: bool
    grid: tuple[int, int] | None
    window: int
    window_2d: int
    region: int
    region_2d: int
    start: int = 0
    impl: str = "auto"
    total: int = 0  # cached decoding: rows are cut from the mask of this many tokens (one cached mask per run)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"attention level {self.level!r} is not one of {', '.join(LEVELS)}")
        if self.impl not in IMPLS:
            raise ValueError(f"model.level_impl={self.impl!r} is not one of {', '.join(IMPLS)}")
        if self.grid is not None and self.grid[0] * self.grid[1] != self.n_keys:
            raise ValueError(f"grid {self.grid[0]}x{self.grid[1]} has {self.grid[0] * self.grid[1]} patches but the "
                             f"input has {self.n_keys} tokens")  # fmt: skip

    @property
    def n_keys(self) -> int:
        """Keys the queries see: every earlier (cached) token and the new ones."""
        return self.start + self.n_queries

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """The dense (T, S) boolean mask (True = attend) this pattern stands for."""
        full = level_mask(
            self.level, max(self.total, self.n_keys), causal=self.causal, grid=self.grid, window=self.window,
            window_2d=self.window_2d, region=self.region, region_2d=self.region_2d, device=device,
        )  # fmt: skip
        return full[self.start : self.n_keys, : self.n_keys] if self.start or self.total else full

    def decode_window(self) -> int:
        """Keys a single cached decoding step needs at the end of the cache (a causal 1-D window), or 0 for all."""
        if self.n_queries == 1 and self.causal and self.grid is None and self.level == "local" and self.impl != "dense":
            return self.window + 1 if self.window + 1 < self.n_keys else 0
        return 0

    def sparse(self) -> bool:
        """Whether :func:`pattern_attend` takes the fast path for this pattern."""
        if self.impl == "dense" or self.start:  # cached steps read a row of the cached mask
            return False
        return self.impl in ("sparse", "flex") or self.n_queries >= AUTO_MIN_TOKENS


def decode_keys(mask, top_k: int, seq_dim: int, *cached: Tensor) -> tuple:
    """(*cached, mask) for one cached decoding step: a causal 1-D local step sees only the cache's last window, so
    the cached tensors are cut to it along seq_dim and the mask drops; anything else passes through unchanged."""
    keep = mask.decode_window() if isinstance(mask, LevelPattern) and top_k == 0 else 0
    if not keep:
        return (*cached, mask)
    return (*(t.narrow(seq_dim, t.shape[seq_dim] - keep, keep) for t in cached), None)


def pattern_attend(q: Tensor, k: Tensor, v: Tensor, pattern: LevelPattern, scale: float) -> Tensor:
    """Attention of q (B, H, T, Dk) over k (B, Hk, S, Dk), v (B, Hk, S, Dv) under pattern -> (B, H, T, Dv)."""
    if pattern.impl == "flex" and not pattern.start:
        if not torch.compiler.is_exporting():
            return flex_attend(q, k, v, pattern, scale)
        pattern = dataclasses.replace(pattern, impl="auto")  # an exported graph takes the default path
    if not pattern.sparse():
        mask = pattern.mask(q.device)
        return sdpa(q, _heads(k, q.shape[1]), _heads(v, q.shape[1]), mask, scale)
    k, v, t = _heads(k, q.shape[1]), _heads(v, q.shape[1]), q.shape[2]
    if pattern.level == "global" or (pattern.level == "local" and pattern.grid is None and pattern.window + 1 >= t):
        return sdpa(q, k, v, None, scale, causal=pattern.causal)  # a window over everything is global
    if pattern.level in ("local", "routed") and pattern.grid is None:  # routed alone: its local part
        return local_1d(q, k, v, pattern.window, pattern.causal, scale)
    if pattern.level in ("local", "routed"):
        return local_2d(q, k, v, pattern.grid, pattern.window_2d // 2, scale)
    if pattern.grid is None:
        return regional_1d(q, k, v, pattern.region, pattern.causal, scale)
    return regional_2d(q, k, v, pattern.grid, pattern.region_2d, scale)


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """Key/value heads (B, Hk, S, D) made n_heads wide; a single shared head (absorbed MLA) is a view."""
    if x.shape[1] == n_heads:
        return x
    if x.shape[1] == 1:
        return x.expand(x.shape[0], n_heads, *x.shape[2:])
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    """SDPA with equal key and value dims, cut back to Dv: fused kernels (CPU flash) want them equal, and padding V,
    as transformers' DeepSeek-V3 does for flash attention, avoids the fallback kernel's (T, S) scores in memory."""
    d_v = v.shape[-1]
    if d_v < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - d_v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)[..., :d_v]


@functools.lru_cache(maxsize=64)
def _band(n: int, window: int, causal: bool, device: str) -> tuple[Tensor, int, int]:
    """Return (allowed (nb, c, L), block c, pad) for 1-D local attention over n tokens in blocks of c queries."""
    c = max(window, 1)
    nb = -(-n // c)
    left, span = window, c + window + (0 if causal else window)
    rel = torch.arange(span)[None, :] - torch.arange(c)[:, None]  # key slot - query row, (c, L)
    band = (rel >= 0) & (rel <= (window if causal else 2 * window))
    key_pos = torch.arange(nb)[:, None] * c - left + torch.arange(span)[None, :]  # (nb, L)
    query_pos = torch.arange(nb)[:, None] * c + torch.arange(c)[None, :]  # (nb, c)
    allowed = band[None] & ((key_pos >= 0) & (key_pos < n))[:, None, :]
    allowed = allowed | (query_pos >= n)[:, :, None]  # padded query rows: anything finite, dropped afterwards
    return allowed.to(device), c, left


def _band_blocks(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Query blocks (B, H, nb, c, Dk) and the key (B, H, nb, L, Dk) and value (B, H, nb, L, Dv) band each one meets."""
    b, h, t, _ = q.shape
    allowed, c, left = _band(t, window, causal, str(q.device))
    nb, span = allowed.shape[0], allowed.shape[-1]
    right = nb * c - t + (span - c - left)  # keys past the end so that every block's band exists
    qb = F.pad(q, (0, 0, 0, nb * c - t)).view(b, h, nb, c, q.shape[-1])
    kb = F.pad(k, (0, 0, left, right)).unfold(2, span, c).transpose(-1, -2)  # views of the padded keys
    vb = F.pad(v, (0, 0, left, right)).unfold(2, span, c).transpose(-1, -2)
    return qb, kb, vb


def _local_1d_parts(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, causal: bool = False, part=None):
    """Blocked sliding-window attention: the output (B, H, T, Dv) and each query's log-sum-exp (B, H, T, 1)."""
    b, h, t, _ = q.shape
    allowed = _band(t, window, causal, str(q.device))[0]
    blocks = functools.partial(_band_blocks, window=window, causal=causal)
    if part is None:  # alone: the scores are recomputed in the backward pass, not kept
        out = blocked_attention(blocks, allowed, scale, q, k, v)
        return out.reshape(b, h, -1, out.shape[-1])[:, :, :t], None
    qb, kb, vb = blocks(q, k, v)
    out, lse = part((qb @ kb.transpose(-1, -2)) * scale, allowed, vb)  # (B, H, nb, c, Dv)
    return out.reshape(b, h, -1, out.shape[-1])[:, :, :t], lse.reshape(b, h, -1, 1)[:, :, :t]


def local_1d(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool, scale: float) -> Tensor:
    """Sliding-window attention, |i - j| <= window (j <= i when causal), in blocks: q, k, v (B, H, T, D)."""
    return _local_1d_parts(q, k, v, window, scale, causal)[0]


@functools.lru_cache(maxsize=64)
def _tiles(grid: tuple[int, int], radius: int, device: str) -> tuple[Tensor, int, tuple[int, int]]:
    """allowed (nbh * nbw, b², (b + 2r)²) for 2-D neighbourhood attention in b x b query tiles, with b and tile counts.

    Each tile of queries meets the (b + 2r)² keys around it; the mask keeps Chebyshev distance <= r on the grid.
    """
    gh, gw = grid
    b = max(4, 2 * radius + 1)
    nbh, nbw = -(-gh // b), -(-gw // b)
    span = b + 2 * radius
    qr = torch.arange(nbh)[:, None, None, None] * b + torch.arange(b)[None, None, :, None]  # (nbh, 1, b, 1)
    qc = torch.arange(nbw)[None, :, None, None] * b + torch.arange(b)[None, None, None, :]  # (1, nbw, 1, b)
    kr = torch.arange(nbh)[:, None, None, None] * b - radius + torch.arange(span)[None, None, :, None]
    kc = torch.arange(nbw)[None, :, None, None] * b - radius + torch.arange(span)[None, None, None, :]
    q_rows = qr.expand(nbh, nbw, b, b).reshape(nbh * nbw, b * b)
    q_cols = qc.expand(nbh, nbw, b, b).reshape(nbh * nbw, b * b)
    k_rows = kr.expand(nbh, nbw, span, span).reshape(nbh * nbw, span * span)
    k_cols = kc.expand(nbh, nbw, span, span).reshape(nbh * nbw, span * span)
    near = torch.maximum(
        (q_rows[:, :, None] - k_rows[:, None, :]).abs(), (q_cols[:, :, None] - k_cols[:, None, :]).abs()
    )
    on_grid = ((k_rows >= 0) & (k_rows < gh) & (k_cols >= 0) & (k_cols < gw))[:, None, :]
    padded_query = ((q_rows >= gh) | (q_cols >= gw))[:, :, None]  # anything finite, dropped afterwards
    return ((near <= radius) & on_grid | padded_query).to(device), b, (nbh, nbw)


def _tile_blocks(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """Query tiles (B, H, tiles, b², Dk) and the key (B, H, tiles, span², Dk) and value tiles around each one."""
    _, b, (nbh, nbw) = _tiles(tuple(grid), radius, str(q.device))
    gh, gw = grid
    bs, h = q.shape[:2]
    span = b + 2 * radius

    def plane(x: Tensor, before: int, after_h: int, after_w: int) -> Tensor:  # (B, H, N, D) -> padded grid
        return F.pad(x.view(bs, h, gh, gw, x.shape[-1]), (0, 0, before, after_w, before, after_h))

    def key_tiles(x: Tensor) -> Tensor:  # -> (B, H, nbh * nbw, span², D)
        padded = plane(x, radius, nbh * b - gh + radius, nbw * b - gw + radius)
        tiles = padded.unfold(2, span, b).unfold(3, span, b)  # (B, H, nbh, nbw, D, span, span)
        return tiles.permute(0, 1, 2, 3, 5, 6, 4).reshape(bs, h, nbh * nbw, span * span, x.shape[-1])

    qt = plane(q, 0, nbh * b - gh, nbw * b - gw).view(bs, h, nbh, b, nbw, b, q.shape[-1])
    return qt.transpose(3, 4).reshape(bs, h, nbh * nbw, b * b, q.shape[-1]), key_tiles(k), key_tiles(v)


def _local_2d_parts(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], radius: int, scale: float, part=None):
    """Neighbourhood attention in query tiles: the output (B, H, N, Dv) and each query's log-sum-exp (B, H, N, 1)."""
    allowed, b, (nbh, nbw) = _tiles(tuple(grid), radius, str(q.device))
    gh, gw = grid
    bs, h = q.shape[:2]

    def back(x: Tensor) -> Tensor:  # (B, H, tiles, b², D) -> (B, H, N, D)
        x = x.view(bs, h, nbh, nbw, b, b, x.shape[-1]).transpose(3, 4).reshape(bs, h, nbh * b, nbw * b, -1)
        return x[:, :, :gh, :gw].reshape(bs, h, gh * gw, -1)

    blocks = functools.partial(_tile_blocks, grid=tuple(grid), radius=radius)
    if part is None:  # alone: the scores are recomputed in the backward pass, not kept
        return back(blocked_attention(blocks, allowed, scale, q, k, v)), None
    qt, kt, vt = blocks(q, k, v)
    out, lse = part((qt @ kt.transpose(-1, -2)) * scale, allowed, vt)
    return back(out), back(lse)


def local_2d(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], radius: int, scale: float) -> Tensor:
    """Neighbourhood attention on a row-major patch grid: Chebyshev distance <= radius; q, k, v (B, H, N, D)."""
    return _local_2d_parts(q, k, v, grid, radius, scale)[0]


@dataclass(frozen=True)
class RoutedPattern:
    """A local pattern plus p routed keys per input, chosen by router scores (B, S); routed keys outside a query's
    window enter with the gate log sigmoid(score) added to their logits, so the router learns from the loss."""

    local: LevelPattern
    scores: Tensor  # (B, S)
    p: int

    @property
    def n_queries(self) -> int:
        """Queries of the local pattern."""
        return self.local.n_queries

    @property
    def n_keys(self) -> int:
        """Keys of the local pattern."""
        return self.local.n_keys

    def selection(self) -> tuple[Tensor, Tensor]:
        """Indices (B, p) of the routed keys and their gates (B, p)."""
        index = self.scores.topk(self.p, dim=-1).indices
        return index, F.logsigmoid(self.scores.gather(-1, index))

    def outside(self, index: Tensor) -> Tensor:
        """(B, T, p): which routed keys lie outside each query's local window (the others are already seen)."""
        local, pos = self.local, torch.arange(self.n_queries, device=index.device)
        if local.grid is None:
            return (pos[None, :, None] - index[:, None, :]).abs() > local.window
        gw = local.grid[1]
        dist = torch.maximum(
            (pos[None, :, None] // gw - index[:, None, :] // gw).abs(),
            (pos[None, :, None] % gw - index[:, None, :] % gw).abs(),
        )
        return dist > local.window_2d // 2

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """The dense float mask (B, 1, T, S): 0 inside the window, the gate on routed keys, -inf elsewhere."""
        index, gate = self.selection()
        b, t = self.scores.shape[0], self.n_queries
        out = self.local.mask(device).to(self.scores.dtype).log()[None].expand(b, t, self.n_keys).clone()
        extra = torch.where(self.outside(index), gate[:, None, :], float("-inf")).to(out.dtype)  # (B, T, p)
        out = out.scatter_reduce(-1, index[:, None, :].expand(b, t, self.p), extra, reduce="amax")
        return out[:, None]


def routed_attend(q: Tensor, k: Tensor, v: Tensor, pattern: RoutedPattern, scale: float) -> Tensor:
    """Attention over each query's local window plus the routed keys, O(n·(k + p)); q, k, v (B, H, T, D)."""
    k, v = _heads(k, q.shape[1]), _heads(v, q.shape[1])
    if not pattern.local.sparse():
        return sdpa(q, k, v, pattern.mask(q.device), scale)
    local = pattern.local
    if local.grid is None:
        out_local, lse_local = _local_1d_parts(q, k, v, local.window, scale, part=_safe_part)
    else:
        out_local, lse_local = _local_2d_parts(q, k, v, local.grid, local.window_2d // 2, scale, part=_safe_part)
    index, gate = pattern.selection()
    pick = index[:, None, :, None]
    k_sel = k.gather(2, pick.expand(-1, k.shape[1], -1, k.shape[-1]))  # (B, H, p, Dk)
    v_sel = v.gather(2, pick.expand(-1, v.shape[1], -1, v.shape[-1]))
    scores = (q @ k_sel.transpose(-1, -2)) * scale + gate[:, None, None, :].to(q.dtype)  # (B, H, T, p)
    out_routed, lse_routed = _safe_part(scores, pattern.outside(index)[:, None], v_sel)
    return _merge(out_local, lse_local, out_routed, lse_routed)


def _safe_part(scores: Tensor, allowed: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax-weighted values and the log-sum-exp of one part of the keys; a row with no allowed key gives 0, -inf."""
    s = scores.masked_fill(~allowed, float("-inf"))
    peak = s.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    e = (s - peak).exp()
    z = e.sum(dim=-1, keepdim=True)
    some = z > 0
    z_safe = torch.where(some, z, torch.ones_like(z))
    lse = torch.where(some, z_safe.log() + peak, torch.full_like(z, float("-inf")))
    return (e @ values) / z_safe, lse


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Combine the attention outputs of two disjoint key sets from their log-sum-exps (part a is never empty)."""
    top = torch.maximum(lse_a, lse_b)
    w_a, w_b = (lse_a - top).exp(), (lse_b - top).exp()
    return (w_a * out_a + w_b * out_b) / (w_a + w_b)
