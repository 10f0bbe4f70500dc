"""Decoding caches: :class:`LatentKVCache` for MLA (c_KV and the shared RoPE key) and :class:`KVCache` for MHA/GQA.

The latent cache is the point of DeepSeek-V2's Multi-head Latent Attention (§2.1.2): per token it keeps
``kv_lora_rank + qk_rope_head_dim`` numbers, where multi-head attention keeps ``n_kv_heads * (qk_head_dim +
v_head_dim)``. Both caches grow by concatenation (like transformers' DynamicCache), which keeps them autograd-safe.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _PairCache:
    """Two tensors that grow together along a sequence axis; batch is axis 0."""

    names: tuple[str, str] = ("first", "second")
    seq_dim: int = 1

    def __init__(self, first: Tensor | None = None, second: Tensor | None = None) -> None:
        if (first is None) != (second is None):
            raise ValueError(f"{type(self).__name__} needs both {self.names[0]} and {self.names[1]}, or neither")
        self._set(first, second)

    @classmethod
    def empty(cls):
        """Return a cache holding no tokens."""
        return cls()

    def _get(self) -> tuple[Tensor | None, Tensor | None]:
        return getattr(self, self.names[0]), getattr(self, self.names[1])

    def _set(self, first: Tensor | None, second: Tensor | None) -> None:
        setattr(self, self.names[0], first)
        setattr(self, self.names[1], second)

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        first = self._get()[0]
        return 0 if first is None else first.shape[self.seq_dim]

    def append(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Append new tokens in place and return the full cached tensors."""
        old_first, old_second = self._get()
        if old_first is not None:
            first = torch.cat((old_first, first), dim=self.seq_dim)
            second = torch.cat((old_second, second), dim=self.seq_dim)
        self._set(first, second)
        return first, second

    def bytes_per_token(self) -> int:
        """Bytes this cache stores per token of one sequence (one layer, all heads), measured on its tensors."""
        if self.length == 0:
            raise ValueError(f"{type(self).__name__} is empty; append tokens before measuring bytes per token")
        tensors = self._get()
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total // (tensors[0].shape[0] * self.length)

    def reorder(self, index: Tensor):
        """Select batch rows by index in place (beam search) and return self."""
        if self.length:
            self._set(*(t.index_select(0, index.to(t.device)) for t in self._get()))
        return self

    def expand(self, n: int):
        """Repeat each batch row n times in place (one copy per beam) and return self."""
        if self.length:
            self._set(*(t.repeat_interleave(n, dim=0) for t in self._get()))
        return self


class LatentKVCache(_PairCache):
    """MLA cache: c_kv (B, S, kv_lora_rank) after its RMSNorm and k_rope (B, S, qk_rope_head_dim) after RoPE."""

    names = ("c_kv", "k_rope")
    seq_dim = 1
    c_kv: Tensor | None
    k_rope: Tensor | None


class KVCache(_PairCache):
    """MHA/GQA cache: k (B, H_kv, S, qk_head_dim) after RoPE and v (B, H_kv, S, v_head_dim)."""

    names = ("k", "v")
    seq_dim = 2
    k: Tensor | None
    v: Tensor | None
