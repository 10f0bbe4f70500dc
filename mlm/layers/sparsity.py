"""Length-adaptive sparsity (the seeds' schedule): the share of keys a routed block or an adaptive top-k keeps.

Short inputs keep most of the work, long ones little of it: ``keep_short`` of the keys up to ``short_len`` tokens,
``keep_long`` from ``long_len``, log-linear between (``model.sparsity_schedule``; the seeds' numbers by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ADAPTIVE = -1  # model.top_k: keep the schedule's share of the keys each query may see


@dataclass(frozen=True)
class KeepSchedule:
    """(short_len, keep_short, long_len, keep_long): what share of n keys to keep, log-linear in n between."""

    short_len: float = 256
    keep_short: float = 0.8
    long_len: float = 1024
    keep_long: float = 0.2

    @classmethod
    def from_config(cls, values) -> KeepSchedule:
        """The schedule of ``model.sparsity_schedule`` ([short_len, keep_short, long_len, keep_long])."""
        values = list(values)
        if len(values) != 4:
            raise ValueError(f"model.sparsity_schedule={values}: four numbers, [short_len, keep_short, long_len, "
                             "keep_long]")  # fmt: skip
        short_len, keep_short, long_len, keep_long = (float(v) for v in values)
        if not (1 <= short_len < long_len) or not (0 < keep_short <= 1 and 0 < keep_long <= 1):
            raise ValueError(f"model.sparsity_schedule={values}: need 1 <= short_len < long_len and keep fractions "
                             "in (0, 1]")  # fmt: skip
        return cls(short_len, keep_short, long_len, keep_long)

    def fraction(self, n_tokens: int) -> float:
        """The share of n keys to keep."""
        return float(self.fractions(torch.tensor([float(n_tokens)]))[0])

    def fractions(self, n: Tensor) -> Tensor:
        """The share to keep for each count in n (float tensor)."""
        t = (n.clamp(self.short_len, self.long_len) / self.short_len).log() / math.log(self.long_len / self.short_len)
        return self.keep_short + (self.keep_long - self.keep_short) * t

    def counts(self, n: Tensor) -> Tensor:
        """Keys to keep (at least one, at most n) for each count in n (integer tensor)."""
        nf = n.double()
        return torch.ceil(self.fractions(nf) * nf - 1e-9).long().clamp(min=1).minimum(n.long().clamp(min=1))


SEEDS = KeepSchedule()


def keep_fraction(n_tokens: int, schedule: KeepSchedule = SEEDS) -> float:
    """The seeds' length-adaptive sparsity: ~80% of the keys under 256 tokens, ~20% over 1,024, log-linear between."""
    return schedule.fraction(n_tokens)


def routed_count(setting: int, n_tokens: int, schedule: KeepSchedule = SEEDS) -> int:
    """Tokens a routed block selects: ``setting`` (> 0, at most n) or, for 0, the length schedule."""
    if setting < 0:
        raise ValueError(f"model.routed_tokens={setting} must be >= 0 (0 = length-adaptive)")
    if setting:
        return min(setting, n_tokens)
    return int(schedule.counts(torch.tensor([n_tokens]))[0])
