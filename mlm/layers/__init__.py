"""Building blocks with no knowledge of modalities: MLA / MHA / GQA attention, RoPE, level masks, SwiGLU."""

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
from mlm.layers.mlp import SwiGLU
from mlm.layers.rope import apply_rope, rope_1d, rope_2d

__all__ = [
    "ATTENTION",
    "GroupedQueryAttention",
    "KVCache",
    "LatentKVCache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "SwiGLU",
    "apply_rope",
    "build_attention",
    "level_mask",
    "rope_1d",
    "rope_2d",
    "top_k_mask",
]
