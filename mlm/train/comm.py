"""Compressed gradient communication for DDP (``train.grad_compression``), registered as DDP communication hooks.

- ``fp16`` / ``bf16`` / ``powersgd``: PyTorch's own hooks (``torch.distributed.algorithms.ddp_comm_hooks``); PowerSGD
  (Vogels et al., 2019) keeps its own error feedback.
- ``int8`` / ``int4``: ours, in the same style. Each bucket's gradient plus the residual left from the previous step
  (error feedback: what quantization dropped is sent later, so the error does not accumulate; Seide et al., 2014;
  Karimireddy et al., 2019) is quantized symmetrically per chunk of 256 values with nearest rounding, int4 codes
  packed two per byte; every process all-gathers the codes and fp32 scales and averages the dequantized gradients.
  ``train.grad_compression_full_every: N`` sends every N-th step in full precision (and clears the residuals).

Each compressing hook also reports its *drift* (:meth:`HookState.drift`): how far the sum of what this process sent
is from the sum of its true gradients, in units of its last gradient's norm. With error feedback that gap is the
residual, which stays bounded; without it (kept but not sent, for comparison) it grows with every step.

Each hook state counts the payload bytes this process sends and has ``state_dict()`` / ``load_state_dict()``, so a
checkpoint keeps the residuals (per parameter name, per process) and a resumed run continues exactly. DDP lays its
buckets out anew after the first step of every process, so a resumed run first takes one uncounted, uncompressed
step with zero gradients (``passthrough``) to reach the layout the interrupted run had. :func:`register` does
nothing (one info line) with one process.
"""

from __future__ import annotations

import abc
import logging

import numpy as np
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


def _done(value: Tensor) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


def _all_reduce_mean(grad: Tensor) -> torch.futures.Future:
    world = dist.get_world_size()
    dist.all_reduce(grad)
    return _done(grad.div_(world))


class HookState(abc.ABC):
    """What every hook state has: the bytes it sent, a pass-through switch and a (tensor) state dict."""

    def __init__(self):
        self.bytes_sent = 0
        self.passthrough = False  # one plain, uncounted all-reduce round (bucket re-layout after a resume)
        self._norm_sq = 0.0  # squared norm of this step's local gradient, over the buckets so far
        self.grad_norm = 0.0  # ... of the last completed step

    def count_gradient(self, bucket) -> None:
        """Add the bucket's local gradient to this step's norm (call before anything is added to it)."""
        self._norm_sq += float(bucket.buffer().float().square().sum())
        if bucket.is_last():
            self.grad_norm, self._norm_sq = self._norm_sq**0.5, 0.0

    def carried(self) -> list[Tensor]:
        """What the process's sent gradients still lack of its true ones, summed over the steps (none here)."""
        return []

    def drift(self) -> float | None:
        """Norm of :meth:`carried` over the last step's gradient norm (None for a hook that carries nothing)."""
        carried = self.carried()
        if not carried:
            return None
        return sum(float(t.float().square().sum()) for t in carried) ** 0.5 / max(self.grad_norm, 1e-30)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint, per process."""
        return {"bytes_sent": torch.tensor(self.bytes_sent, dtype=torch.int64)}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`'s tensors."""
        self.bytes_sent = int(tensors["bytes_sent"])

    @abc.abstractmethod
    def communicate(self, bucket) -> torch.futures.Future:
        """Average the bucket's gradient over the processes."""

    def __call__(self, bucket) -> torch.futures.Future:
        """Run one bucket through the hook (or plainly, in a pass-through round)."""
        if self.passthrough:
            return _all_reduce_mean(bucket.buffer())
        return self.communicate(bucket)


def comm_hook(state: HookState, bucket):  # no annotations: DDP compares them to its own types
    """The DDP communication hook of every mode (``model.register_comm_hook(state, comm_hook)``)."""
    return state(bucket)


quantized_hook = comm_hook  # the name the int8/int4 hook had


class QuantizedAllReduce(HookState):
    """The int8/int4 hook: bits, error-feedback residuals (per parameter), full rounds, bytes sent."""

    def __init__(self, bits: int, full_every: int = 0, error_feedback: bool = True, names: dict | None = None,
                 start: int = 0):  # fmt: skip
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: 4 or 8")
        self.bits, self.full_every, self.error_feedback = bits, full_every, error_feedback
        self.names = names or {}  # id(parameter) -> its name, so residuals survive DDP's bucket re-layout
        self.residuals: dict[str, Tensor] = {}
        self.step = 0  # completed steps (a step ends with the last bucket)
        self.start = start  # steps sent in full before the first compressed one

    def _full_round(self) -> bool:
        return self.step < self.start or (self.full_every > 0 and (self.step + 1) % self.full_every == 0)

    def _slices(self, bucket) -> list[tuple[str, int, int]]:
        """(parameter name, offset, numel) of each gradient in the bucket's flat buffer."""
        found, offset = [], 0
        for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            found.append((self.names.get(id(param), f"id{id(param)}"), offset, grad.numel()))
            offset += grad.numel()
        return found

    def communicate(self, bucket) -> torch.futures.Future:
        """Average the bucket's gradient over the processes from quantized codes (or in full on a full round)."""
        world = dist.get_world_size()
        grad = bucket.buffer()
        slices = self._slices(bucket)
        self.count_gradient(bucket)
        if self._full_round():
            for name, _, _ in slices:
                self.residuals.pop(name, None)
            self.bytes_sent += grad.numel() * grad.element_size()
            future = _all_reduce_mean(grad)
        else:
            wanted = grad.float().clone()
            for name, offset, numel in slices:
                if self.error_feedback and name in self.residuals:
                    wanted[offset : offset + numel] += self.residuals[name]
            codes, scales = quantize(wanted, self.bits)
            dropped = wanted - dequantize(codes, scales, self.bits, grad.numel())
            for name, offset, numel in slices:
                part = dropped[offset : offset + numel]
                if not self.error_feedback and name in self.residuals:  # never sent: it adds up
                    part = part + self.residuals[name]
                self.residuals[name] = part.clone()
            all_codes = [torch.empty_like(codes) for _ in range(world)]
            all_scales = [torch.empty_like(scales) for _ in range(world)]
            dist.all_gather(all_codes, codes)
            dist.all_gather(all_scales, scales)
            total = sum(dequantize(c, s, self.bits, grad.numel()) for c, s in zip(all_codes, all_scales, strict=True))
            grad.copy_(total / world)
            self.bytes_sent += codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
            future = _done(grad)
        if bucket.is_last():
            self.step += 1
        return future

    def carried(self) -> list[Tensor]:
        """The residuals: sent next step with error feedback, only summed without it."""
        return list(self.residuals.values())

    def state_dict(self) -> dict[str, Tensor]:
        """Step, bytes and the residual of every parameter."""
        residuals = {f"residual.{name}": value for name, value in self.residuals.items()}
        return {**super().state_dict(), "step": torch.tensor(self.step), **residuals}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore step, bytes and residuals."""
        super().load_state_dict(tensors)
        self.step = int(tensors["step"])
        self.residuals = {
            k.removeprefix("residual."): v.float() for k, v in tensors.items() if k.startswith("residual.")
        }


class HalfPrecision(HookState):
    """PyTorch's fp16/bf16 compression hook, counting the two bytes it sends per value."""

    def __init__(self, dtype: torch.dtype):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        super().__init__()
        self.dtype = dtype
        self.hook = default_hooks.fp16_compress_hook if dtype == torch.float16 else default_hooks.bf16_compress_hook

    def communicate(self, bucket) -> torch.futures.Future:
        """Cast, all-reduce and cast back (PyTorch's hook)."""
        self.bytes_sent += bucket.buffer().numel() * 2
        return self.hook(None, bucket)


class LowRank(HookState):
    """PyTorch's PowerSGD hook and state (rank-r factors with error feedback and warm start), with byte counts and a
    checkpointable state: its step, per-bucket errors and factors, and the generator its first factors came from."""

    def __init__(self, rank: int, start: int = 2):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as power_sgd

        super().__init__()
        self.hook = power_sgd.powerSGD_hook
        # PowerSGD needs >= 2 plain steps: DDP re-lays its buckets out after the first
        self.state = power_sgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                             start_powerSGD_iter=max(2, start), use_error_feedback=True,
                                             warm_start=True)  # fmt: skip

    def communicate(self, bucket) -> torch.futures.Future:
        """One PowerSGD round (plain all-reduce for its first steps, as PowerSGD needs)."""
        state = self.state
        before = state.total_numel_after_compression
        self.count_gradient(bucket)
        if state.iter < state.start_powerSGD_iter:
            self.bytes_sent += bucket.buffer().numel() * bucket.buffer().element_size()
        future = self.hook(state, bucket)
        self.bytes_sent += (state.total_numel_after_compression - before) * bucket.buffer().element_size()
        return future

    _DICTS = ("error_dict", "p_memory_dict", "q_memory_dict")

    def carried(self) -> list[Tensor]:
        """PowerSGD's per-bucket errors (its error feedback)."""
        return list(self.state.error_dict.values())

    def state_dict(self) -> dict[str, Tensor]:
        """Step, bytes, the per-bucket tensors and the numpy generator's state."""
        state = self.state
        tensors = {**super().state_dict(), "iter": torch.tensor(state.iter)}
        for field in self._DICTS:
            tensors.update({f"{field}.{index}": value for index, value in getattr(state, field).items()})
        _, keys, pos, has_gauss, cached = state.rng.get_state()
        tensors["rng.keys"] = torch.from_numpy(keys.astype(np.int64))
        tensors["rng.rest"] = torch.tensor([pos, has_gauss, cached], dtype=torch.float64)
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        super().load_state_dict(tensors)
        state = self.state
        state.iter = int(tensors["iter"])
        for field in self._DICTS:
            prefix = f"{field}."
            setattr(state, field, {int(k[len(prefix) :]): v for k, v in tensors.items() if k.startswith(prefix)})
        pos, has_gauss, cached = tensors["rng.rest"].tolist()
        keys = tensors["rng.keys"].numpy().astype(np.uint32)
        state.rng.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))


def tagged_state(state: HookState, mode: str) -> dict[str, Tensor]:
    """The state's tensors for a checkpoint, with the mode they belong to."""
    return {**state.state_dict(), "mode": torch.tensor(MODES.index(mode))}


def restore(state: HookState, tensors: dict[str, Tensor], mode: str) -> None:
    """Load a checkpoint's hook state when it was saved by the same mode; otherwise the hook starts fresh."""
    saved = MODES[int(tensors["mode"])] if "mode" in tensors else None
    if saved == mode:
        state.load_state_dict(tensors)
    else:
        logger.info("the checkpoint holds no %s gradient state (it has %s); the hook starts fresh", mode, saved)


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


def _build_state(train, names: dict) -> HookState:
    """The hook state of ``train.grad_compression`` (a mode other than none)."""
    mode = train.grad_compression
    if mode in ("fp16", "bf16"):
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        _check_backend(dtype, mode)
        return HalfPrecision(dtype)
    start = getattr(train, "grad_compression_start", 0)
    if mode == "powersgd":
        return LowRank(train.grad_compression_rank, start)
    bits = 4 if mode == "int4" else 8
    feedback = getattr(train, "grad_compression_error_feedback", True)
    return QuantizedAllReduce(bits, train.grad_compression_full_every, feedback, names, start)


def register(model, train, accelerator) -> HookState | None:
    """Register the hook ``train.grad_compression`` names on a DDP-wrapped model; returns its state (None when off)."""
    mode = train.grad_compression
    if mode not in MODES:
        raise ValueError(f"train.grad_compression={mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if accelerator.num_processes == 1:
        logger.info("train.grad_compression=%s: one process, nothing is communicated; training uncompressed", mode)
        return None
    if not hasattr(model, "register_comm_hook"):
        kind = getattr(getattr(accelerator, "distributed_type", None), "value", type(model).__name__)
        raise ValueError(f"train.grad_compression={mode}: gradient compression runs under DDP only, not {kind}")
    state = _build_state(train, {id(p): name for name, p in model.named_parameters()})
    model.register_comm_hook(state, comm_hook)
    logger.info("gradients travel as %s between %d processes", mode, accelerator.num_processes)
    return state
