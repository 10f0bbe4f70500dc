"""One multimodal decoder layer: causal self-attention over text, cross-modal attention over image tokens, SwiGLU.

The layout follows CoCa's multimodal text decoder (Yu et al., 2022) with DeepSeek-V2's Multi-head Latent Attention
in both attention slots: the text queries of the cross-modal attention read the image's latent c_KV, which
:meth:`CrossModalBlock.encode_context` computes once per image and every decoding step reuses. No RoPE is applied
across modalities; with ``model.cross_pos_keys`` the decoupled (RoPE) key of each image token instead carries a
learned projection of its patch position, so a query such as "top left" can find its patches by place, apart from
what they show (content and spatial parts of the score kept apart, as in Conditional DETR, Meng et al., 2021).
"""

from __future__ import annotations

from torch import Tensor, nn

from mlm.config import ModelConfig
from mlm.encoders.block import ffn_hidden_dim
from mlm.layers.mla import build_attention
from mlm.layers.mlp import SwiGLU


class CrossModalBlock(nn.Module):
    """Pre-norm causal self-attention + cross-modal attention over image tokens + SwiGLU, residual around each."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = build_attention(cfg.dim, cfg.mla, cfg.attention, norm_eps=cfg.norm_eps)
        self.cross_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = build_attention(
            cfg.dim, cfg.mla, cfg.attention, cross=True, norm_eps=cfg.norm_eps, pos_keys=cfg.cross_pos_keys,
            gain=cfg.cross_query_gain,
        )  # fmt: skip
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, ffn_hidden_dim(cfg), cfg.dropout)

    def encode_context(self, image_tokens: Tensor, positions: Tensor | None = None):
        """Return this layer's cross-attention cache for image tokens (B, N, C), computed once per image."""
        return self.cross_attn.encode_context(image_tokens, positions)

    def forward(
        self,
        x: Tensor,
        *,
        context,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache=None,
        absorbed: bool = False,
        context_pos: Tensor | None = None,
    ) -> Tensor:
        """Return text states x (B, T, C) after the three sub-layers.

        ``context`` is the image tokens (B, N, C) or this layer's :meth:`encode_context` result; ``cache`` is the
        self-attention cache that incremental decoding appends to; ``context_pos`` the image tokens' position
        features (positional keys only).
        """
        x = x + self.self_attn(self.self_norm(x), rope=rope, mask=mask, cache=cache, absorbed=absorbed)
        x = x + self.cross_attn(self.cross_norm(x), context=context, context_pos=context_pos, absorbed=absorbed)
        return x + self.ffn(self.ffn_norm(x))
