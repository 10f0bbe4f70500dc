"""Weight sharing across modalities: one module for both, or one copy per modality, plus the modality embedding.

``sharing`` in the model config picks what is per modality (see :func:`separate_modules`): ``full`` shares every
weight (one transformer for text and patches), ``norms`` gives each modality its own normalisation layers as in
MS-CLIP (You et al., 2022), ``ffn`` additionally gives each modality its own feed-forward expert, as in VLMo's
mixture-of-modality-experts (Bao et al., 2022), and ``none`` separates the attention too: two towers of the same
shape, the baseline the shared design is measured against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

MODALITIES = ("image", "text")


# model.sharing -> what each modality has of its own: (norms, feed-forward, attention)
SHARING = {"full": (False, False, False), "norms": (True, False, False), "ffn": (True, True, False),
           "none": (True, True, True)}  # fmt: skip


def separate_modules(sharing: str) -> tuple[bool, bool]:
    """Return (separate_norms, separate_ffn) for a ``model.sharing`` value."""
    return SHARING[sharing][:2]


def separate_attention(sharing: str) -> bool:
    """Whether each modality has its own attention weights (``model.sharing=none``)."""
    return SHARING[sharing][2]


def check_modality(modality: str) -> str:
    """Return modality unchanged, or raise ValueError when it is not 'image' or 'text'."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is not one of {', '.join(MODALITIES)}")
    return modality


class PerModality(nn.Module):
    """Holds one module shared by both modalities, or one copy per modality; ``forward(x, modality)`` picks it."""

    def __init__(self, factory: Callable[[], nn.Module], separate: bool):
        super().__init__()
        self.separate = separate
        if separate:
            self.experts = nn.ModuleDict({m: factory() for m in MODALITIES})
        else:
            self.shared = factory()

    def get(self, modality: str) -> nn.Module:
        """Return the module that serves this modality."""
        check_modality(modality)
        return self.experts[modality] if self.separate else self.shared

    def forward(self, x: Tensor, modality: str) -> Tensor:
        """Apply the module of this modality to x."""
        return self.get(modality)(x)


class ModalityEmbedding(nn.Module):
    """A learned vector per modality added to every token, so the shared blocks know what they read."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(MODALITIES), dim))  # (2, C)
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, modality: str) -> Tensor:
        """Return x (B, T, C) plus this modality's embedding."""
        return x + self.weight[MODALITIES.index(check_modality(modality))].to(x.dtype)
