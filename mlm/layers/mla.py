"""Multi-head Latent Attention (MLA) from DeepSeek-V2 (arXiv:2405.04434, §2.1) as used in DeepSeek-V3.

Queries: h -> W_DQ (q_lora_rank) -> RMSNorm -> W_UQ -> [q_nope | q_rope] per head (q_lora_rank = 0: a plain W_Q).
Keys/values: h -> W_DKV -> [c_KV (kv_lora_rank) | k_rope] with RMSNorm on c_KV; k_nope and v come from c_KV through
one up-projection (kv_b_proj = [W_UK; W_UV] per head); k_rope is a single RoPE key shared by all heads. Scores use
[q_nope; q_rope]·[k_nope; k_rope] / sqrt(qk_nope_head_dim + qk_rope_head_dim). Parameter names are those of
transformers' ``DeepseekV3Attention`` so weights copy across directly.

Two paths compute the same function: *naive* materialises K and V per head (training, prefill); *absorbed* folds
W_UK into the query and W_UV into the output and attends over c_KV itself (decoding), so a step reads only the
latent cache. As cross-attention, text queries attend to image tokens' latents with no RoPE across modalities; the
image latent is computed once by :meth:`MultiHeadLatentAttention.encode_context` and reused at every step.
:meth:`MultiHeadLatentAttention.attention_weights` computes the softmax weights explicitly, for attention maps only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mlm.layers.attention import (
    GroupedQueryAttention,
    MultiHeadAttention,
    attend,
    attend_scores,
    check_mask,
    check_pos_keys,
    check_positions,
    check_sources,
    dense_mask,
    query_gain,
    rope_for_heads,
    scale_queries,
)
from mlm.layers.kv_cache import KVCache, LatentKVCache
from mlm.layers.level_attention import decode_keys, sdpa
from mlm.layers.rope import apply_rope

if TYPE_CHECKING:
    from mlm.config import MLAConfig

__all__ = [
    "ATTENTION",
    "GroupedQueryAttention",
    "KVCache",
    "LatentKVCache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "build_attention",
]


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight a Linear applies; for an unmerged PEFT LoRA layer (``mlm.lora``) that is the base weight
    plus its active low-rank updates, so the absorbed path computes what the layer's forward does."""
    if hasattr(linear, "get_delta_weight") and not linear.merged:
        weight = linear.get_base_layer().weight
        return weight + sum(linear.get_delta_weight(name).to(weight.dtype) for name in linear.active_adapters)
    return linear.weight


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA with low-rank queries and a latent KV cache; naive and absorbed paths."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int = 0,
        cross: bool = False,
        norm_eps: float = 1e-6,
        pos_keys: bool = False,
        gain: float = 0.0,
    ) -> None:
        super().__init__()
        check_pos_keys(pos_keys, cross)
        self.n_heads, self.cross = n_heads, cross
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim**-0.5  # over the full q·k dim, not over the latent dim of the absorbed path
        if q_lora_rank > 0:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(dim, n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        # cross-attention with positional keys: the shared decoupled key also gets a projection of the key's position
        self.pos_key = nn.Linear(dim, qk_rope_head_dim, bias=False) if pos_keys else None
        self.query_log_gain = query_gain(n_heads, gain, cross)  # cross-attention: a learned sharpness per head

    def new_cache(self) -> LatentKVCache:
        """Return an empty latent cache for step-by-step decoding."""
        return LatentKVCache.empty()

    def encode_context(self, context: Tensor, positions: Tensor | None = None) -> LatentKVCache:
        """Compress context tokens (B, S, C) to their latent once, for reuse by every decoding step.

        ``positions`` (1 or B, S, C) are the context tokens' position features, needed with positional keys.
        """
        if not self.cross:
            raise ValueError("encode_context is for cross-attention; this MultiHeadLatentAttention has cross=False")
        c_kv, k_rope = self._latent(context)
        if self.pos_key is not None:
            k_rope = k_rope + self.pos_key(check_positions(positions, context).to(k_rope.dtype))  # (B, S, rope)
        return LatentKVCache(c_kv, k_rope)

    def _queries(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return q_nope (B, H, T, nope) and q_rope (B, H, T, rope), before RoPE."""
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank > 0 else self.q_proj(x)
        q = q.view(b, t, self.n_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, Dk)
        q = scale_queries(q, self.query_log_gain)
        return q.split((self.qk_nope_head_dim, self.qk_rope_head_dim), dim=-1)

    def _latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the normed latent c_kv (B, S, kv_lora_rank) and the shared key k_rope (B, S, rope), before RoPE."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.qk_rope_head_dim), dim=-1)
        return self.kv_a_layernorm(c_kv), k_rope

    def _up_weights(self) -> tuple[Tensor, Tensor]:
        """Return W_UK (H, nope, r) and W_UV (H, v, r), views of kv_b_proj.weight."""
        w = linear_weight(self.kv_b_proj).view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w.split((self.qk_nope_head_dim, self.v_head_dim), dim=1)

    def _naive(self, q_nope, q_rope, c_kv, k_rope, mask, top_k) -> Tensor:
        """Materialise per-head K and V from the latent and attend; returns (B, H, T, v)."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, -1).transpose(1, 2)  # (B, H, S, nope + v)
        k_nope, v = kv.split((self.qk_nope_head_dim, self.v_head_dim), dim=-1)
        k_rope = k_rope[:, None].expand(b, self.n_heads, s, self.qk_rope_head_dim)  # one key for all heads
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, Dk)
        k = torch.cat((k_nope, k_rope), dim=-1)  # (B, H, S, Dk)
        return attend(q, k, v, mask, self.scale, top_k)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, top_k, joint=None) -> Tensor:
        """Attend over the latent directly: q·W_UK as the query, W_UV applied after; returns (B, H, T, v).

        ``joint`` is [c_kv | k_rope] as one tensor when the cache stores it so (:class:`LatentKVCache`).
        """
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        if q_latent.shape[2] == 1 and joint is not None and top_k == 0:
            out_latent = self._fused_step(q_latent[:, :, 0], q_rope[:, :, 0], joint, mask)
        elif q_latent.shape[2] == 1:
            out_latent = self._decode_step(q_latent[:, :, 0], q_rope[:, :, 0], c_kv, k_rope, mask, top_k)
        else:
            q = torch.cat((q_latent, q_rope), dim=-1)  # (B, H, T, r + rope)
            k = torch.cat((c_kv, k_rope), dim=-1)[:, None] if joint is None else joint[:, None]  # one shared "head"
            out_latent = attend(q, k, c_kv[:, None], mask, self.scale, top_k)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", out_latent, w_uv)

    def _fused_step(self, q_latent, q_rope, joint, mask) -> Tensor:
        """One query per row over the joint cache in one fused attention call: (B, H, r) -> (B, H, 1, r).

        The H heads are H queries of a single key/value "head" whose keys and values are both the joint rows
        [c_kv | k_rope], so the cache is read once, in place; the RoPE part of the weighted values is dropped.
        """
        joint, mask = decode_keys(mask, 0, 1, joint)
        mask = dense_mask(mask, joint.device)
        if mask is not None:  # (1, S) or (B, 1, 1, S): the step's row, the same for every head
            mask = mask[..., -1:, :].reshape(-1, 1, 1, mask.shape[-1])
        q = torch.cat((q_latent, q_rope), dim=-1)[:, None]  # (B, 1, H, r + rope)
        kv = joint[:, None]  # (B, 1, S, r + rope)
        out = sdpa(q, kv, kv, mask, self.scale)  # (B, 1, H, r + rope)
        return out[:, 0, :, None, : self.kv_lora_rank]

    def _decode_step(self, q_latent, q_rope, c_kv, k_rope, mask, top_k) -> Tensor:
        """One query per row over separate latent and RoPE caches (top-k, fixed-length ONNX caches): (B, H, r) queries
        -> (B, H, 1, r). The two score parts are accumulated by one ``baddbmm``; heads ride in the row axis."""
        c_kv, k_rope, mask = decode_keys(mask, top_k, 1, c_kv, k_rope)
        mask = dense_mask(mask, c_kv.device)
        step_mask = None if mask is None else mask[..., 0, :]  # (S,) or (B, 1, S)
        scores = torch.baddbmm(q_rope @ k_rope.transpose(1, 2), q_latent, c_kv.transpose(1, 2))  # (B, H, S)
        return attend_scores(scores * self.scale, c_kv, step_mask, top_k)[:, :, None]

    def _project(self, x: Tensor, rope, cache: LatentKVCache | None, context, positions=None) -> tuple[Tensor, ...]:
        """Queries of x and the keys' latent: (q_nope, q_rope, c_kv, k_rope, joint), RoPE applied, cache appended;
        joint is the cache's [c_kv | k_rope] tensor, or None when the keys come from no LatentKVCache."""
        q_nope, q_rope = self._queries(x)
        if self.cross:
            latent = context if isinstance(context, LatentKVCache) else self.encode_context(context, positions)
            return q_nope, q_rope, latent.c_kv, latent.k_rope, latent.joint
        c_kv, k_rope = self._latent(x)
        if rope is not None:
            cos, sin = rope_for_heads(rope, x.shape[1])
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, *rope)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)
        return q_nope, q_rope, c_kv, k_rope, getattr(cache, "joint", None)

    @torch.no_grad()
    def attention_weights(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        context: Tensor | LatentKVCache | None = None,
        context_pos: Tensor | None = None,
    ) -> Tensor:
        """Softmax attention weights (B, H, T, S) of queries x (B, T, C), computed explicitly (for visualisation).

        Same arguments as :meth:`forward` without a cache; the weights are those the naive path multiplies its
        values by, so ``o_proj(weights @ V)`` equals ``forward``. Not used by training or decoding.
        """
        check_sources(self, rope, None, context)
        q_nope, q_rope, c_kv, k_rope, _ = self._project(x, rope, None, context, context_pos)
        w_uk, _ = self._up_weights()
        k_nope = torch.einsum("bsr,hnr->bhsn", c_kv, w_uk)  # (B, H, S, nope)
        scores = q_nope @ k_nope.transpose(-1, -2) + (q_rope @ k_rope[:, None].transpose(-1, -2))  # (B, H, T, S)
        mask = dense_mask(check_mask(mask, x.shape[1], c_kv.shape[1]), c_kv.device)
        if mask is not None and mask.is_floating_point():  # a routed block's mask carries the router's gates
            scores = scores + mask
        elif mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.float() * self.scale).softmax(dim=-1).to(x.dtype)

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: LatentKVCache | None = None,
        context: Tensor | LatentKVCache | None = None,
        context_pos: Tensor | None = None,
        absorbed: bool = False,
        top_k: int = 0,
    ) -> Tensor:
        """Attend from x (B, T, C) and return (B, T, C).

        rope gives the positions of the T new tokens; mask (T, S) or (B, 1, T, S) covers all S keys, cached ones
        included; a self-attention cache grows in place; cross-attention reads context (tokens or encode_context()),
        with context_pos (1 or B, S, C), the tokens' position features, when built with positional keys.
        """
        check_sources(self, rope, cache, context)
        b, t, _ = x.shape
        q_nope, q_rope, c_kv, k_rope, joint = self._project(x, rope, cache, context, context_pos)
        mask = check_mask(mask, t, c_kv.shape[1])
        if absorbed:
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, mask, top_k, joint)  # (B, H, T, v)
        else:
            out = self._naive(q_nope, q_rope, c_kv, k_rope, mask, top_k)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_head_dim))


ATTENTION = {"mla": MultiHeadLatentAttention, "mha": MultiHeadAttention, "gqa": GroupedQueryAttention}


def build_attention(
    dim: int,
    cfg: MLAConfig,
    kind: str,
    cross: bool = False,
    norm_eps: float = 1e-6,
    pos_keys: bool = False,
    gain: float = 0.0,
) -> nn.Module:
    """Build the attention module named by kind (mla | mha | gqa) from the attention settings cfg.

    ``pos_keys`` (cross-attention only): keys get a learned projection of the context's position features in their
    RoPE dims, so a query can select keys by where they are apart from what they hold (as Conditional DETR).
    ``gain`` (cross-attention only, > 0): each head's queries are multiplied by a learned gain starting there.
    """
    if kind not in ATTENTION:
        raise ValueError(f"attention kind {kind!r} is not one of {', '.join(ATTENTION)}")
    heads = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    if kind == "mla":
        return MultiHeadLatentAttention(
            dim, cfg.n_heads, cfg.kv_lora_rank, *heads, q_lora_rank=cfg.q_lora_rank, cross=cross, norm_eps=norm_eps,
            pos_keys=pos_keys, gain=gain,
        )  # fmt: skip
    if kind == "gqa":
        return GroupedQueryAttention(
            dim, cfg.n_heads, cfg.n_kv_heads, *heads, cross=cross, pos_keys=pos_keys, gain=gain
        )
    return MultiHeadAttention(dim, cfg.n_heads, *heads, cross=cross, pos_keys=pos_keys, gain=gain)
