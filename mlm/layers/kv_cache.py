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
    """Two tensors that grow together along a sequence axis; batch is axis 0.

    The tokens live in ``_buffers`` (with spare room), which :meth:`_pack` makes from the two tensors and
    :meth:`_unpack` turns back into them; by default these are the two tensors themselves.
    """

    names: tuple[str, str] = ("first", "second")
    seq_dim: int = 1

    def __init__(self, first: Tensor | None = None, second: Tensor | None = None) -> None:
        if (first is None) != (second is None):
            raise ValueError(f"{type(self).__name__} needs both {self.names[0]} and {self.names[1]}, or neither")
        self._buffers = None if first is None else self._pack(first, second)  # no spare room yet
        self._length = 0 if first is None else first.shape[self.seq_dim]
        self._publish()

    @classmethod
    def empty(cls):
        """Return a cache holding no tokens."""
        return cls()

    def _pack(self, first: Tensor, second: Tensor) -> tuple[Tensor, ...]:
        return first, second

    def _unpack(self, buffers: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        return buffers

    def _filled(self) -> tuple[Tensor, ...] | None:
        """The buffers cut to the cached tokens."""
        if self._buffers is None:
            return None
        return tuple(buffer.narrow(self.seq_dim, 0, self._length) for buffer in self._buffers)

    def _publish(self) -> None:
        filled = self._filled()
        parts = (None, None) if filled is None else self._unpack(filled)
        for name, part in zip(self.names, parts, strict=True):
            setattr(self, name, part)

    def copy(self):
        """Return a cache over the same tokens whose appends leave this one untouched."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._buffers = self._filled()  # no spare room: its first append copies
        other._publish()
        return other

    def _get(self) -> tuple[Tensor | None, Tensor | None]:
        return getattr(self, self.names[0]), getattr(self, self.names[1])

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        return self._length

    def _has_room(self, needed: int) -> bool:
        """Whether the buffers hold needed tokens and may be written here (inference tensors only in inference mode)."""
        buffer = self._buffers[0]
        writable = torch.is_inference_mode_enabled() or not buffer.is_inference()
        return writable and buffer.shape[self.seq_dim] >= needed

    def append(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Append new tokens (batch and head axes as stored) in place and return the full cached tensors."""
        new, dim = self._pack(first, second), self.seq_dim
        start, needed = self._length, self._length + first.shape[dim]
        old = self._filled()
        if old is None:
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
        self._length = needed
        self._publish()
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
            self._buffers = tuple(t.index_select(0, index.to(t.device)) for t in self._filled())
            self._publish()
        return self

    def expand(self, n: int):
        """Repeat each batch row n times in place (one copy per beam) and return self."""
        if self.length:
            self._buffers = tuple(t.repeat_interleave(n, dim=0) for t in self._filled())
            self._publish()
        return self


def _grown(tensor: Tensor, dim: int, capacity: int) -> Tensor:
    """Return a new buffer of the given capacity along dim, starting with tensor's contents."""
    shape = list(tensor.shape)
    shape[dim] = capacity
    buffer = tensor.new_empty(shape)
    buffer.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return buffer


class LatentKVCache(_PairCache):
    """MLA cache: c_kv (B, S, kv_lora_rank) after its RMSNorm and k_rope (B, S, qk_rope_head_dim) after RoPE.

    Both live in one buffer, ``joint`` = [c_kv | k_rope] (B, S, kv_lora_rank + qk_rope_head_dim), of which c_kv and
    k_rope are views: a decoding step scores the whole key in one product and weights the latent from the same rows.
    """

    names = ("c_kv", "k_rope")
    seq_dim = 1
    c_kv: Tensor | None
    k_rope: Tensor | None

    def __init__(self, c_kv: Tensor | None = None, k_rope: Tensor | None = None) -> None:
        self._rank = None if c_kv is None else c_kv.shape[-1]
        super().__init__(c_kv, k_rope)

    def _pack(self, first: Tensor, second: Tensor) -> tuple[Tensor, ...]:
        return (torch.cat((first, second), dim=-1),)

    def _unpack(self, buffers: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        joint = buffers[0]
        rope = joint.shape[-1] - self._rank
        return joint.split((self._rank, rope), dim=-1)

    def append(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Append new latents (B, t, kv_lora_rank) and RoPE keys (B, t, rope); return the full cached tensors."""
        if self._buffers is not None and first.shape[-1] != self._rank:
            raise ValueError(f"LatentKVCache holds latents of size {self._rank}, got {first.shape[-1]}")
        self._rank = first.shape[-1]
        return super().append(first, second)

    @property
    def joint(self) -> Tensor | None:
        """[c_kv | k_rope] (B, S, kv_lora_rank + qk_rope_head_dim) as stored: no copy."""
        filled = self._filled()
        return None if filled is None else filled[0]


class KVCache(_PairCache):
    """MHA/GQA cache: k (B, H_kv, S, qk_head_dim) after RoPE and v (B, H_kv, S, v_head_dim)."""

    names = ("k", "v")
    seq_dim = 2
    k: Tensor | None
    v: Tensor | None
