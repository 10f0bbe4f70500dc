"""Building blocks with no knowledge of modalities: MLA / MHA / GQA attention, RoPE, level masks, SwiGLU.

SwiGLU lives in :mod:`mlm.layers.mlp` and is not re-exported here, so importing attention does not import timm.
"""

from mlm.layers.masks import level_mask, top_k_mask
from mlm.layers.mla import (
    ATTENTION,
    GroupedQueryAttention,
    KVCache,
    LatentKVCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    build_attention,
)
from mlm.layers.rope import apply_rope, rope_1d, rope_2d

__all__ = [
    "ATTENTION",
    "GroupedQueryAttention",
    "KVCache",
    "LatentKVCache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "apply_rope",
    "build_attention",
    "level_mask",
    "rope_1d",
    "rope_2d",
    "top_k_mask",
]
