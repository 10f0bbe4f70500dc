"""One block of the shared-weight encoder: pre-norm attention plus a SwiGLU feed-forward, residual around each.

``model.sharing`` decides whether the norms (MS-CLIP), the feed-forward (VLMo experts) and, for two towers
(``none``), the attention are per modality (see :mod:`mlm.encoders.sharing`). The block's attention level
(local / regional / global) only changes the mask it is given; top-k key selection applies in global blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

from mlm.config import ModelConfig
from mlm.encoders.sharing import PerModality, check_modality, separate_attention, separate_modules
from mlm.layers.level_attention import LevelPattern, RoutedPattern
from mlm.layers.mla import build_attention
from mlm.layers.mlp import SwiGLU
from mlm.layers.sparsity import ADAPTIVE, KeepSchedule, routed_count


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """Return the SwiGLU width: ``model.ffn_hidden_dim`` when set, else 2/3 of mlp_ratio * dim (LLaMA), rounded up
    to a multiple of 8.

    Three matrices at 2/3 of the width keep the parameter count of a two-matrix MLP with the same mlp_ratio.
    """
    if cfg.ffn_hidden_dim > 0:
        return cfg.ffn_hidden_dim
    hidden = int(2 * cfg.mlp_ratio * cfg.dim / 3)
    return max(8, -(-hidden // 8) * 8)


class EncoderBlock(nn.Module):
    """Pre-norm attention + SwiGLU block whose weights image and text tokens share (as ``model.sharing`` says)."""

    def __init__(self, cfg: ModelConfig, level: str):
        super().__init__()
        separate_norms, separate_ffn = separate_modules(cfg.sharing)
        self.level = level
        schedule = KeepSchedule.from_config(cfg.sparsity_schedule)
        # -1: the schedule's share of the keys each query may see (top_k_mask takes the schedule for k)
        self.top_k = (schedule if cfg.top_k == ADAPTIVE else cfg.top_k) if level == "global" else 0
        self.schedule = schedule
        self.attn_norm = PerModality(lambda: nn.RMSNorm(cfg.dim, eps=cfg.norm_eps), separate_norms)
        self.attn = build_attention(cfg.dim, cfg.mla, cfg.attention, norm_eps=cfg.norm_eps)  # text (and images)
        # Two towers (sharing=none): images get attention weights of their own; the text cache stays on self.attn.
        separate = separate_attention(cfg.sharing)
        self.image_attn = build_attention(cfg.dim, cfg.mla, cfg.attention, norm_eps=cfg.norm_eps) if separate else None
        self.ffn_norm = PerModality(lambda: nn.RMSNorm(cfg.dim, eps=cfg.norm_eps), separate_norms)
        self.ffn = PerModality(lambda: SwiGLU(cfg.dim, ffn_hidden_dim(cfg), cfg.dropout), separate_ffn)
        # routed level: a light scorer picks the keys every patch attends to beyond its window (the seeds' routing)
        self.router = nn.Linear(cfg.dim, 1, bias=False) if level == "routed" else None
        self.routed_tokens = cfg.routed_tokens

    def attention(self, modality: str) -> nn.Module:
        """The attention module that serves this modality."""
        if check_modality(modality) == "image" and self.image_attn is not None:
            return self.image_attn
        return self.attn

    def forward(
        self,
        x: Tensor,
        modality: str,
        *,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache=None,
        absorbed: bool = False,
    ) -> Tensor:
        """Return x (B, T, C) after attention (with an optional KV cache) and the feed-forward."""
        h = self.attn_norm(x, modality)
        if self.router is not None and isinstance(mask, LevelPattern) and mask.level == "routed":
            mask = RoutedPattern(
                mask, self.router(h).squeeze(-1), routed_count(self.routed_tokens, h.shape[1], self.schedule)
            )
        x = x + self.attention(modality)(h, rope=rope, mask=mask, cache=cache, absorbed=absorbed, top_k=self.top_k)
        return x + self.ffn(self.ffn_norm(x, modality), modality)
