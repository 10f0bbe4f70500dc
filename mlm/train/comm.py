"""Compressed gradient communication for DDP (``train.grad_compression``), registered as DDP communication hooks.

- ``fp16`` / ``bf16`` / ``powersgd``: PyTorch's own hooks (``torch.distributed.algorithms.ddp_comm_hooks``); PowerSGD
  (Vogels et al., 2019) keeps its own error feedback.
- ``int8`` / ``int4``: ours, in the same style. Each bucket's gradient plus the residual left from the previous step
  (error feedback: what quantization dropped is sent later, so the error does not accumulate; Seide et al., 2014;
  Karimireddy et al., 2019) is quantized symmetrically per chunk of 256 values with nearest rounding, int4 codes
  packed two per byte; every process all-gathers the codes and fp32 scales and averages the dequantized gradients.
  ``train.grad_compression_full_every: N`` sends every N-th step in full precision (and clears the residuals).

Each hook counts the bytes this process sends; :func:`register` does nothing (one info line) with one process.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

CHUNK = 256  # values per quantization scale
MODES = ("none", "fp16", "bf16", "int8", "int4", "powersgd")


def quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Codes and per-chunk fp32 scales of a flat tensor: int8 codes, or int4 codes packed two per uint8."""
    levels = 2 ** (bits - 1) - 1  # 127 or 7: symmetric, so zero stays exact
    chunks = F.pad(x.float(), (0, (-x.numel()) % CHUNK)).view(-1, CHUNK)
    scales = chunks.abs().amax(dim=1).clamp_min(1e-30) / levels  # (C,)
    codes = torch.round(chunks / scales[:, None]).clamp_(-levels, levels).to(torch.int8).view(-1)
    if bits == 4:
        nibbles = (codes + 8).to(torch.uint8)
        codes = nibbles[0::2] | (nibbles[1::2] << 4)
    return codes, scales


def dequantize(codes: Tensor, scales: Tensor, bits: int, numel: int) -> Tensor:
    """The flat fp32 tensor of ``numel`` values that :func:`quantize` encoded."""
    if bits == 4:
        values = torch.stack([codes & 0x0F, codes >> 4], dim=1).view(-1).to(torch.int8) - 8
    else:
        values = codes
    return (values.view(-1, CHUNK).float() * scales[:, None]).view(-1)[:numel]


class QuantizedAllReduce:
    """The state of the int8/int4 hook (:func:`quantized_hook`): bits, error-feedback residuals, bytes sent."""

    def __init__(self, bits: int, full_every: int = 0, error_feedback: bool = True):
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: 4 or 8")
        self.bits, self.full_every, self.error_feedback = bits, full_every, error_feedback
        self.residuals: dict[int, Tensor] = {}
        self.step = 0  # completed steps (a step ends with the last bucket)
        self.bytes_sent = 0

    def _full_round(self) -> bool:
        return self.full_every > 0 and (self.step + 1) % self.full_every == 0

    def communicate(self, bucket):
        """Average the bucket's gradient over the processes from quantized codes (or in full on a full round)."""
        group = dist.group.WORLD
        world = dist.get_world_size(group)
        grad, index = bucket.buffer(), bucket.index()
        if self._full_round():
            self.residuals.pop(index, None)
            dist.all_reduce(grad, group=group)
            grad.div_(world)
            self.bytes_sent += grad.numel() * grad.element_size()
        else:
            wanted = grad.float() + self.residuals.get(index, 0.0)
            codes, scales = quantize(wanted, self.bits)
            if self.error_feedback:
                self.residuals[index] = wanted - dequantize(codes, scales, self.bits, grad.numel())
            all_codes = [torch.empty_like(codes) for _ in range(world)]
            all_scales = [torch.empty_like(scales) for _ in range(world)]
            dist.all_gather(all_codes, codes, group=group)
            dist.all_gather(all_scales, scales, group=group)
            total = sum(dequantize(c, s, self.bits, grad.numel()) for c, s in zip(all_codes, all_scales, strict=True))
            grad.copy_(total / world)
            self.bytes_sent += codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
        if bucket.is_last():
            self.step += 1
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(grad)
        return future


def quantized_hook(state: QuantizedAllReduce, bucket):  # no annotations: DDP compares them to its own types
    """The int8/int4 DDP communication hook (``model.register_comm_hook(QuantizedAllReduce(...), quantized_hook)``)."""
    return state.communicate(bucket)


class HalfPrecision:
    """The state of :func:`half_precision_hook`: which of PyTorch's hooks, and the bytes it sent."""

    def __init__(self, dtype: torch.dtype):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.dtype, self.bytes_sent = dtype, 0
        self.hook = default_hooks.fp16_compress_hook if dtype == torch.float16 else default_hooks.bf16_compress_hook


def half_precision_hook(state: HalfPrecision, bucket):
    """PyTorch's fp16/bf16 compression hook, counting the two bytes it sends per value."""
    state.bytes_sent += bucket.buffer().numel() * 2
    return state.hook(None, bucket)


def _check_backend(dtype: torch.dtype, mode: str) -> None:
    """A mode whose dtype the backend cannot reduce is named in one line, before training starts."""
    probe = torch.ones(1, dtype=dtype)
    try:
        dist.all_reduce(probe)
    except (RuntimeError, ValueError) as err:
        backend = dist.get_backend()
        raise ValueError(
            f"train.grad_compression={mode}: the {backend} backend cannot reduce {dtype} ({err})"
        ) from None


def register(model, train, accelerator):
    """Register the hook ``train.grad_compression`` names on a DDP-wrapped model; returns it (None when off)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as power_sgd

    mode = train.grad_compression
    if mode not in MODES:
        raise ValueError(f"train.grad_compression={mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if accelerator.num_processes == 1 or not hasattr(model, "register_comm_hook"):
        logger.info("train.grad_compression=%s: one process, nothing is communicated; training uncompressed", mode)
        return None
    if mode in ("fp16", "bf16"):
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        _check_backend(dtype, mode)
        state = HalfPrecision(dtype)
        model.register_comm_hook(state, half_precision_hook)
    elif mode == "powersgd":
        state = power_sgd.PowerSGDState(process_group=None, matrix_approximation_rank=train.grad_compression_rank,
                                        start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)  # fmt: skip
        model.register_comm_hook(state, power_sgd.powerSGD_hook)
    else:
        state = QuantizedAllReduce(4 if mode == "int4" else 8, train.grad_compression_full_every)
        model.register_comm_hook(state, quantized_hook)
    logger.info("gradients travel as %s between %d processes", mode, accelerator.num_processes)
    return state
