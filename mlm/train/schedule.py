"""Optimiser and learning-rate schedule: AdamW with decoupled weight decay (Loshchilov & Hutter 2019) and a linear
warmup followed by a cosine decay to zero (the factor of transformers' ``get_cosine_schedule_with_warmup``).

With ``train.fit_steps_to_time`` the cosine's end moves, after the first steps and then every REFIT_EVERY steps,
to the step count that fits in ``train.max_time_s`` at the measured pace: a run on a slow machine then still decays
its learning rate to zero instead of being cut off at a high one.

Weight decay skips norms, biases, embeddings and the logit scale/bias, as in open_clip and nanoGPT: shrinking a
gain, an offset, a lookup row or a temperature towards zero regularises nothing useful.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlm.config import TrainConfig

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """True for parameters that weight decay should leave alone."""
    kind = type(module).__name__.lower()  # also catches project classes such as RMSNorm or ModalityEmbedding
    if param.ndim < 2 or isinstance(module, _NO_DECAY_MODULES) or "norm" in kind or "embedding" in kind:
        return True
    # Directly owned tensors such as ``pos_embed`` or ``modality_embed`` (not the weight of a Linear/Conv).
    return "embed" in name or "logit" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group (norms/biases/embeddings)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue  # tied weights appear under two modules; the first owner decides
            seen.add(id(param))
            (no_decay if _is_no_decay(module, name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``train.lr``, ``train.betas`` and ``train.weight_decay``."""
    if len(train.betas) != 2:
        raise ValueError(f"train.betas={train.betas} must hold two numbers, e.g. [0.9, 0.98]")
    # The fused kernel exists on CUDA only; foreach is the fast path on CPU.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas), eps=1e-6, fused=fused or None
    )


class WarmupCosine:
    """LR factor of a step: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` (movable)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        """The factor at ``step`` (transformers' cosine schedule with half a cycle)."""
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``train.warmup_steps`` then cosine decay to 0 at ``train.max_steps``."""
    if train.warmup_steps < 0 or train.max_steps <= 0:
        raise ValueError(
            f"train.warmup_steps={train.warmup_steps} must be >= 0 and train.max_steps={train.max_steps} > 0"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(train.warmup_steps, train.max_steps))


FIT_FROM = 5  # the first steps (allocations, caches) are slower than the rest and are not timed
REFIT_EVERY = 50  # then the end is fitted again every this many steps, at the pace of those steps


class TimeFit:
    """``train.fit_steps_to_time``: times steps FIT_FROM..``end``, then every REFIT_EVERY steps, and says how many
    steps fit the budget at the latest pace (a machine's pace can change by half within one run)."""

    def __init__(self, train: TrainConfig, margin: float = 0.03):
        self.end = max(FIT_FROM + 20, min(train.warmup_steps, 100))  # inside the warmup: the cosine has not started
        self.limit_s, self.max_steps, self.margin = train.max_time_s, train.max_steps, margin
        self._tick: float | None = None
        self._from = FIT_FROM
        self._first = True

    def pace(self, step: int, elapsed_s: float) -> float | None:
        """Call after each step with the run's training seconds so far; the seconds a step took since the last
        measurement, when one is due (else None)."""
        if self._tick is None:
            if step >= FIT_FROM:  # a run resumed past FIT_FROM starts timing at its first step
                self._tick, self._from = elapsed_s, step
            return None
        due = max(self.end, self._from + 20) if self._first else self._from + REFIT_EVERY
        if step < due:
            return None
        pace = (elapsed_s - self._tick) / (step - self._from)
        self._tick, self._from, self._first = elapsed_s, step, False
        return pace

    def total(self, step: int, elapsed_s: float, pace_s: float) -> int:
        """The schedule's last step: what fits in the budget (less a margin) at ``pace_s``, within (step, max_steps]."""
        left = self.limit_s * (1.0 - self.margin) - elapsed_s
        return max(step + 1, min(self.max_steps, step + int(left / max(pace_s, 1e-9))))
