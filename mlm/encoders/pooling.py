"""Pooling each modality into one vector of the shared image-text space: hierarchical multi-level pooling.

Each attention level present in the encoder (local → regional → global) gives one pooled vector: a small scoring MLP
rates every position, a softmax over the positions turns the ratings into weights, and the weighted sum of the hidden
states is that level's vector (attention pooling as in Set Transformer's PMA / Ilse et al., 2018). Learned level
weights, initialised from 0.1 for the lowest present level to 1.0 for the highest, mix the level vectors; one
projection shared by both modalities maps the mix into the common space, followed by L2 normalisation (CLIP).
The per-position softmax weights are returned so that they can be drawn over an image. :class:`MeanPooling` (the
mean of the last block's states through the same kind of projection) is the baseline the ablation compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlm.layers.masks import LEVELS

LEVEL_WEIGHT_INIT = ("ramp", "uniform")  # 0.1 (lowest present level) -> 1.0 (highest), or all 1.0


@dataclass
class PooledOutput:
    """Result of hierarchical pooling for one batch."""

    embeds: Tensor  # (B, E) L2-normalised embeddings in the shared space
    pooled: Tensor  # (B, C) level-weighted mix before the projection
    weights: dict[str, Tensor]  # level -> (B, T) softmax weights over positions (0 at masked positions)
    projected: Tensor | None = None  # (B, E) the projection before L2 normalisation


def present_levels(levels: list[str]) -> list[str]:
    """Return the distinct levels of a per-block list, ordered local → regional → global."""
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level {level!r} is not one of {', '.join(LEVELS)}")
    return [level for level in LEVELS if level in levels]


def last_block_of_level(levels: list[str]) -> dict[str, int]:
    """Return, for each present level, the index of its last block (whose output that level pools)."""
    return {level: max(i for i, name in enumerate(levels) if name == level) for level in present_levels(levels)}


class HierarchicalPooling(nn.Module):
    """Per-level attention pooling, learned level weights, shared projection and L2 normalisation."""

    def __init__(self, dim: int, levels: list[str], hidden_dim: int, embed_dim: int, level_weight_init: str = "ramp"):
        super().__init__()
        if level_weight_init not in LEVEL_WEIGHT_INIT:
            raise ValueError(f"level_weight_init={level_weight_init!r} is not one of {', '.join(LEVEL_WEIGHT_INIT)}")
        self.levels = present_levels(levels)
        if not self.levels:
            raise ValueError("hierarchical pooling needs at least one level")
        self.scorers = nn.ModuleDict(
            {
                level: nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
                for level in self.levels
            }
        )
        n = len(self.levels)
        init = torch.linspace(0.1, 1.0, n) if n > 1 and level_weight_init == "ramp" else torch.ones(n)
        self.level_weights = nn.Parameter(init)  # (L,) ramp: low level 0.1 → high level 1.0
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def pool_level(self, level: str, states: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return (pooled (B, C), weights (B, T)) for one level; mask (B, T) is True at real positions."""
        scores = self.scorers[level](states).squeeze(-1)  # (B, T)
        if mask is not None:
            if mask.shape != scores.shape:
                raise ValueError(f"pooling mask has shape {tuple(mask.shape)}, expected {tuple(scores.shape)}")
            if not torch.compiler.is_exporting() and not bool(mask.any(dim=-1).all()):  # data-dependent: not in graphs
                raise ValueError("every row needs at least one real (mask=True) position to pool")
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.float().softmax(dim=-1).to(states.dtype)  # (B, T)
        return torch.einsum("bt,btc->bc", weights, states), weights

    def forward(self, states: dict[str, Tensor], mask: Tensor | None = None) -> PooledOutput:
        """Pool the per-level hidden states {level: (B, T, C)} into L2-normalised embeddings (B, E)."""
        missing = [level for level in self.levels if level not in states]
        if missing:
            raise ValueError(f"hierarchical pooling needs states for levels {missing}; got {sorted(states)}")
        pooled, weights = [], {}
        for level in self.levels:
            vector, weights[level] = self.pool_level(level, states[level], mask)
            pooled.append(vector)
        mixed = torch.einsum("l,lbc->bc", self.level_weights.to(pooled[0].dtype), torch.stack(pooled))  # (B, C)
        projected = self.proj(mixed)
        return PooledOutput(F.normalize(projected, dim=-1), mixed, weights, projected)


class MeanPooling(nn.Module):
    """Masked mean of the last block's states, the shared projection and L2 normalisation (no level weights)."""

    def __init__(self, dim: int, levels: list[str], hidden_dim: int, embed_dim: int, level_weight_init: str = "ramp"):
        super().__init__()
        present_levels(levels)  # checks the names
        self.levels = [levels[-1]]  # the last block's level (it pools that level's last block); hidden_dim unused
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, states: dict[str, Tensor], mask: Tensor | None = None) -> PooledOutput:
        """Pool {level: (B, T, C)} by the mean over real positions of the last block's level."""
        level = self.levels[0]
        x = states[level]  # (B, T, C)
        keep = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        if not bool((keep.sum(dim=-1) > 0).all()):
            raise ValueError("every row needs at least one real (mask=True) position to pool")
        weights = keep / keep.sum(dim=-1, keepdim=True)  # (B, T)
        mixed = torch.einsum("bt,btc->bc", weights, x)
        projected = self.proj(mixed)
        return PooledOutput(F.normalize(projected, dim=-1), mixed, {level: weights}, projected)


POOLING = {"hierarchical": HierarchicalPooling, "mean": MeanPooling}


class WordHead(nn.Linear):
    """SuperClass's word head (Huang et al., 2024): caption-word logits (B, V) of each image, from its pooled
    embedding, or with ``patches`` from every patch through the shared projection, each word keeping its best
    patch (multiple-instance learning: a word must be found somewhere, so every patch learns what it is not)."""

    def __init__(self, embed_dim: int, vocab_size: int, patches: bool = False):
        super().__init__(embed_dim, vocab_size)
        self.patches = patches

    def logits(self, image, proj: nn.Module) -> Tensor:
        """Word logits of image features (``projected`` (B, E), ``tokens`` (B, N, C)); ``proj`` maps C to E."""
        if not self.patches:
            return self(image.projected)
        return self(proj(image.tokens)).amax(dim=1)  # (B, N, V) -> (B, V)
