"""Decoding caches: :class:`LatentKVCache` for MLA (c_KV and the shared RoPE key) and :class:`KVCache` for MHA/GQA.

The latent cache is the point of DeepSeek-V2's Multi-head Latent Attention (§2.1.2): per token it keeps
``kv_lora_rank + qk_rope_head_dim`` numbers, where multi-head attention keeps ``n_kv_heads * (qk_head_dim +
v_head_dim)``. Tokens are written into buffers with spare room that double when full, so a decoding step copies only
its new token (concatenation would copy the whole cache every step); while autograd records the inputs, the caches
grow by concatenation instead, which leaves every tensor a backward pass saved untouched.
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
        self._buffers = None if first is None else (first, second)  # the given tensors, no spare room yet
        self._set(first, second)

    @classmethod
    def empty(cls):
        """Return a cache holding no tokens."""
        return cls()

    def copy(self):
        """Return a cache over the same tokens whose appends leave this one untouched."""
        return type(self)(*self._get())

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

    def _has_room(self, needed: int) -> bool:
        """Whether the buffers hold needed tokens and may be written here (inference tensors only in inference mode)."""
        buffer = self._buffers[0]
        writable = torch.is_inference_mode_enabled() or not buffer.is_inference()
        return writable and buffer.shape[self.seq_dim] >= needed

    def append(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Append new tokens (batch and head axes as stored) in place and return the full cached tensors."""
        old, new, dim = self._get(), (first, second), self.seq_dim
        start, needed = self.length, self.length + first.shape[dim]
        if old[0] is None:
            self._buffers = new
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (*old, *new)):
            # autograd may have saved the cached tensors for backward, so they must stay as they are
            self._buffers = tuple(torch.cat(pair, dim=dim) for pair in zip(old, new, strict=True))
        else:
            if not self._has_room(needed):
                capacity = max(needed, 2 * start)
                self._buffers = tuple(_grown(t, dim, capacity) for t in old)
            for buffer, tokens in zip(self._buffers, new, strict=True):
                buffer.narrow(dim, start, tokens.shape[dim]).copy_(tokens)
        self._set(*(buffer.narrow(dim, 0, needed) for buffer in self._buffers))
        return self._get()

    def bytes_per_token(self) -> int:
        """Bytes per token of one sequence (one layer, all heads), measured on the cached tensors (spare room aside)."""
        if self.length == 0:
            raise ValueError(f"{type(self).__name__} is empty; append tokens before measuring bytes per token")
        tensors = self._get()
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total // (tensors[0].shape[0] * self.length)

    def reorder(self, index: Tensor):
        """Select batch rows by index in place (beam search) and return self."""
        if self.length:
            self._buffers = tuple(t.index_select(0, index.to(t.device)) for t in self._get())
            self._set(*self._buffers)
        return self

    def expand(self, n: int):
        """Repeat each batch row n times in place (one copy per beam) and return self."""
        if self.length:
            self._buffers = tuple(t.repeat_interleave(n, dim=0) for t in self._get())
            self._set(*self._buffers)
        return self


def _grown(tensor: Tensor, dim: int, capacity: int) -> Tensor:
    """Return a new buffer of the given capacity along dim, starting with tensor's contents."""
    shape = list(tensor.shape)
    shape[dim] = capacity
    buffer = tensor.new_empty(shape)
    buffer.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return buffer


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
