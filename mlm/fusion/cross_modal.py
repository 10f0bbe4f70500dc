"""One multimodal decoder layer: causal self-attention over text, cross-modal attention over image tokens, SwiGLU.

The layout follows CoCa's multimodal text decoder (Yu et al., 2022) with DeepSeek-V2's Multi-head Latent Attention
in both attention slots: the text queries of the cross-modal attention read the image's latent c_KV, which
:meth:`CrossModalBlock.encode_context` computes once per image and every decoding step reuses. No RoPE is applied
across modalities.
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
        self.cross_attn = build_attention(cfg.dim, cfg.mla, cfg.attention, cross=True, norm_eps=cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, ffn_hidden_dim(cfg), cfg.dropout)

    def encode_context(self, image_tokens: Tensor):
        """Return this layer's cross-attention cache for image tokens (B, N, C), computed once per image."""
        return self.cross_attn.encode_context(image_tokens)

    def forward(
        self,
        x: Tensor,
        *,
        context,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache=None,
        absorbed: bool = False,
    ) -> Tensor:
        """Return text states x (B, T, C) after the three sub-layers.

        ``context`` is the image tokens (B, N, C) or this layer's :meth:`encode_context` result; ``cache`` is the
        self-attention cache that incremental decoding appends to.
        """
        x = x + self.self_attn(self.self_norm(x), rope=rope, mask=mask, cache=cache, absorbed=absorbed)
        x = x + self.cross_attn(self.cross_norm(x), context=context, absorbed=absorbed)
        return x + self.ffn(self.ffn_norm(x))
