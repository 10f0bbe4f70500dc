"""A short causal convolution at the decoder's input (``model.decoder_short_conv``).

To answer "where is the red circle?" the decoder's cross-attention must search the image from the position that
predicts the answer, so that position first has to gather "red" and "circle" from a few tokens back through
self-attention: two steps that are only rewarded together. A depthwise causal convolution over the last k text
states hands every position a learned mix of its recent tokens in one step, as the short convolutions of H3 (Fu et
al., 2023) and Based (Arora et al., 2024) let attention learn associative recall quickly. Its weights start at zero,
so a new model starts as the plain decoder. Cached decoding keeps the last k - 1 inputs (:class:`ConvHistory`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ConvHistory:
    """The last ``k - 1`` decoder inputs (B, k - 1, C) of every sequence, zeros before the first token."""

    def __init__(self) -> None:
        self.tail: Tensor | None = None

    def extend(self, x: Tensor, keep: int) -> Tensor:
        """Return the kept tail followed by new inputs x (B, t, C), and keep the last ``keep`` of them."""
        past = x.new_zeros(x.shape[0], keep, x.shape[2]) if self.tail is None else self.tail
        window = torch.cat((past, x), dim=1)
        self.tail = window[:, window.shape[1] - keep :]
        return window

    def reorder(self, index: Tensor):
        """Select batch rows by index in place (beam search) and return self."""
        if self.tail is not None:
            self.tail = self.tail.index_select(0, index.to(self.tail.device))
        return self

    def expand(self, n: int):
        """Repeat each batch row n times in place (one copy per beam) and return self."""
        if self.tail is not None:
            self.tail = self.tail.repeat_interleave(n, dim=0)
        return self


class ShortConv(nn.Module):
    """x + a depthwise causal convolution of x over the last ``kernel`` positions, per channel."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=False)
        nn.init.zeros_(self.conv.weight)  # starts as the identity

    def forward(self, x: Tensor, history: ConvHistory | None = None) -> Tensor:
        """Return (B, t, C) for inputs x (B, t, C); ``history`` holds the inputs before them when decoding."""
        keep = self.conv.kernel_size[0] - 1
        if history is None:
            window = F.pad(x, (0, 0, keep, 0))  # zeros before the first token
        else:
            window = history.extend(x, keep)
        return x + self.conv(window.transpose(1, 2)).transpose(1, 2)
