"""Attention core shared by every kind, plus the multi-head (MHA) and grouped-query (GQA) baselines.

:func:`attend` runs scaled dot-product attention with boolean masks (True = attend) and optional top-k sparse
selection; key/value heads may be fewer than query heads (GQA, Ainslie et al., 2023; MQA, Shazeer, 2019). MHA and
GQA offer the same call interface as :class:`mlm.layers.mla.MultiHeadLatentAttention` so that a config field can
swap them for ablations and benchmarks. Their query/key head dim is ``qk_nope_head_dim + qk_rope_head_dim`` with RoPE
on the last ``qk_rope_head_dim`` dims, and their value head dim is ``v_head_dim``, matching MLA head for head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mlm.layers.kv_cache import KVCache
from mlm.layers.level_attention import LevelPattern, RoutedPattern, decode_keys, pattern_attend, routed_attend, sdpa
from mlm.layers.masks import top_k_mask
from mlm.layers.rope import apply_rope


def check_mask(mask, n_queries: int, n_keys: int):
    """Return mask if it is boolean and shaped (T, S) or (B, 1, T, S), or a level pattern over T queries and S keys;
    raise ValueError otherwise."""
    if mask is None:
        return None
    if isinstance(mask, (LevelPattern, RoutedPattern)):
        if (mask.n_queries, mask.n_keys) != (n_queries, n_keys):
            raise ValueError(
                f"level pattern covers {mask.n_queries} queries over {mask.n_keys} keys; got {n_queries} over {n_keys}"
            )
        return mask
    shape = tuple(mask.shape)
    ok_rank = mask.dim() == 2 or (mask.dim() == 4 and shape[1] == 1)
    if mask.dtype != torch.bool or not ok_rank or shape[-2:] != (n_queries, n_keys):
        raise ValueError(
            f"attention mask must be boolean with shape ({n_queries}, {n_keys}) or (B, 1, {n_queries}, {n_keys}) "
            f"for {n_queries} queries over {n_keys} keys; got dtype={mask.dtype}, shape={shape}"
        )
    return mask


def check_sources(module: nn.Module, rope, cache, context) -> None:
    """Raise ValueError when the rope/cache/context arguments do not fit a self- or cross-attention module."""
    name = type(module).__name__
    if module.cross:
        if context is None:
            raise ValueError(f"cross-attention {name} needs context= (image tokens or encode_context())")
        if rope is not None or cache is not None:
            raise ValueError(f"cross-attention {name} takes no rope= (no RoPE across modalities) and no cache=")
    elif context is not None:
        raise ValueError(f"self-attention {name} takes no context=; build it with cross=True for cross-attention")


def check_pos_keys(pos_keys: bool, cross: bool) -> None:
    """Raise ValueError when positional keys are asked of a self-attention module."""
    if pos_keys and not cross:
        raise ValueError("pos_keys=True is for cross-attention (keys from a context with positions); set cross=True")


def query_gain(n_heads: int, init: float, cross: bool) -> nn.Parameter | None:
    """The log of a learned per-head gain on the queries, starting at ``init`` (0: none); cross-attention only."""
    if init < 0 or (init > 0 and not cross):
        raise ValueError(f"query_gain={init}: a gain > 0 on the queries of a cross-attention module (0: none)")
    return nn.Parameter(torch.full((n_heads,), math.log(init))) if init > 0 else None


def scale_queries(q: Tensor, log_gain: Tensor | None) -> Tensor:
    """Queries (B, H, T, D) times their head's gain (unchanged without one): a head's search sharpens or softens."""
    return q if log_gain is None else q * log_gain.exp().to(q.dtype)[:, None, None]


def check_positions(positions: Tensor | None, context: Tensor) -> Tensor:
    """Return the context's position features (1 or B, S, C) if they fit context (B, S, C); raise otherwise."""
    if positions is None:
        raise ValueError("this cross-attention has positional keys: give the context's positions (context_pos=)")
    batch_ok = positions.dim() == 3 and positions.shape[0] in (1, context.shape[0])
    if not batch_ok or positions.shape[1:] != context.shape[1:]:
        raise ValueError(
            f"context positions of shape {tuple(positions.shape)} do not fit a context of shape {tuple(context.shape)}"
        )
    return positions


def rope_for_heads(rope: tuple[Tensor, Tensor], n_tokens: int) -> tuple[Tensor, Tensor]:
    """Check cos/sin, (T, d) or (B, T, d), against T and return them broadcastable over a head axis (B, H, T, d)."""
    cos, sin = rope
    if cos.shape[-2] != n_tokens or cos.shape != sin.shape:
        raise ValueError(f"rope cos/sin of shapes {tuple(cos.shape)}/{tuple(sin.shape)} do not cover {n_tokens} tokens")
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def attend_scores(scores: Tensor, v: Tensor, mask: Tensor | None, top_k: int = 0) -> Tensor:
    """Softmax scaled scores (..., T, S) over allowed keys (the top_k best unless top_k is 0); weights v (..., S, D)."""
    keep = top_k_mask(scores, mask, top_k) if top_k != 0 else mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1) @ v


def dense_mask(mask, device: torch.device) -> Tensor | None:
    """The mask as a tensor: a level pattern built densely (the reference its fast path is tested against)."""
    return mask.mask(device) if isinstance(mask, (LevelPattern, RoutedPattern)) else mask


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float, top_k: int = 0) -> Tensor:
    """Attention of q (B, H, T, Dk) over k (B, Hk, S, Dk), v (B, Hk, S, Dv) -> (B, H, T, Dv).

    Each key/value head serves H // Hk consecutive query heads. mask is boolean (T, S) or (B, 1, T, S), or a level
    pattern (:mod:`mlm.layers.level_attention`, which skips masked work on long inputs); top_k > 0 keeps only the k
    best allowed keys per query, a :class:`~mlm.layers.sparsity.KeepSchedule` its share of the keys each may see.
    """
    b, h, t, _ = q.shape
    if isinstance(mask, RoutedPattern) and top_k == 0:
        return routed_attend(q, k, v, mask, scale)
    if isinstance(mask, LevelPattern) and top_k == 0 and t > 1:
        return pattern_attend(q, k, v, mask, scale)
    k, v, mask = decode_keys(mask, top_k, 2, k, v)
    mask = dense_mask(mask, q.device)
    h_kv, d_v = k.shape[1], v.shape[-1]
    groups = h // h_kv
    if groups > 1 and t == 1:
        # Decoding: fold the query heads that share a key head into the query axis, one kernel call, no K/V copies.
        q = q.reshape(b, h_kv, groups, q.shape[-1])  # (B, Hk, G, Dk)
        if mask is not None:
            mask = mask.expand(*mask.shape[:-2], groups, mask.shape[-1])
    elif groups > 1 and top_k == 0 and (mask is None or groups * mask.numel() <= k.numel() + v.numel()):
        # Several queries per key head: the group's query rows stacked on the query axis, the mask repeated to
        # match, while its G copies hold fewer entries than one copy of K and V (the copies made below otherwise).
        q = q.reshape(b, h_kv, groups * t, q.shape[-1])  # (B, Hk, G*T, Dk)
        if mask is not None:
            mask = mask.repeat(*(1,) * (mask.ndim - 2), groups, 1)
    elif groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, Dk)
        v = v.repeat_interleave(groups, dim=1)  # (B, H, S, Dv)
    if top_k != 0 or t == 1:
        # Explicit scores for top-k, and for decoding, where SDPA's fallback kernel would rescale every cached key.
        out = attend_scores((q @ k.transpose(-1, -2)) * scale, v, mask, top_k)  # scores (B, H, T, S)
    else:
        out = sdpa(q, k, v, mask, scale)
    return out.reshape(b, h, t, d_v)


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention: n_kv_heads key/value heads, each shared by n_heads // n_kv_heads query heads."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        cross: bool = False,
        pos_keys: bool = False,
        gain: float = 0.0,
    ) -> None:
        super().__init__()
        check_pos_keys(pos_keys, cross)
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.cross = n_heads, n_kv_heads, cross
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim**-0.5
        self.q_proj = nn.Linear(dim, n_heads * self.qk_head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.qk_head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * v_head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        # positional keys (cross-attention): a projection of each key's position is added to its RoPE dims
        self.pos_key = nn.Linear(dim, n_kv_heads * qk_rope_head_dim, bias=False) if pos_keys else None
        self.query_log_gain = query_gain(n_heads, gain, cross)

    def new_cache(self) -> KVCache:
        """Return an empty cache for step-by-step decoding."""
        return KVCache.empty()

    def encode_context(self, context: Tensor, positions: Tensor | None = None) -> KVCache:
        """Project context tokens (B, S, C) to keys and values once, for reuse by every decoding step.

        ``positions`` (1 or B, S, C) are the context tokens' position features, needed with positional keys.
        """
        if not self.cross:
            raise ValueError(f"encode_context is for cross-attention; this {type(self).__name__} has cross=False")
        k, v = self._keys_values(context)
        if self.pos_key is not None:
            pos = self.pos_key(check_positions(positions, context).to(k.dtype))  # (1|B, S, Hk * rope)
            pos = pos.view(pos.shape[0], pos.shape[1], self.n_kv_heads, self.qk_rope_head_dim).transpose(1, 2)
            k = torch.cat((k[..., : self.qk_nope_head_dim], k[..., self.qk_nope_head_dim :] + pos), dim=-1)
        return KVCache(k, v)

    def _keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, s, _ = x.shape
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.qk_head_dim).transpose(1, 2)  # (B, Hk, S, Dk)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.v_head_dim).transpose(1, 2)  # (B, Hk, S, Dv)
        return k, v

    def _rotate_tail(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Apply RoPE to the last qk_rope_head_dim dims of each head."""
        nope, rot = x.split((self.qk_nope_head_dim, self.qk_rope_head_dim), dim=-1)
        return torch.cat((nope, apply_rope(rot, cos, sin)), dim=-1)

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        context: Tensor | KVCache | None = None,
        context_pos: Tensor | None = None,
        absorbed: bool = False,
        top_k: int = 0,
    ) -> Tensor:
        """Attend from x (B, T, C) and return (B, T, C); absorbed is accepted for a uniform interface (no-op)."""
        check_sources(self, rope, cache, context)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, Dk)
        q = scale_queries(q, self.query_log_gain)
        if self.cross:
            cached = context if isinstance(context, KVCache) else self.encode_context(context, context_pos)
            k, v = cached.k, cached.v
        else:
            k, v = self._keys_values(x)
            if rope is not None:
                cos, sin = rope_for_heads(rope, t)
                q, k = self._rotate_tail(q, cos, sin), self._rotate_tail(k, cos, sin)
            if cache is not None:
                k, v = cache.append(k, v)
        out = attend(q, k, v, check_mask(mask, t, k.shape[2]), self.scale, top_k)  # (B, H, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_head_dim))


class MultiHeadAttention(GroupedQueryAttention):
    """Standard multi-head attention: one key/value head per query head."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        cross: bool = False,
        pos_keys: bool = False,
        gain: float = 0.0,
    ) -> None:
        super().__init__(
            dim, n_heads, n_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, cross=cross, pos_keys=pos_keys,
            gain=gain,
        )  # fmt: skip
