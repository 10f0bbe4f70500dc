"""Run guards: non-finite loss skipping, SIGTERM/SIGINT as a clean stop request, and CUDA out-of-memory advice.

A non-finite step is skipped (no optimiser update) and counted; ``max_consecutive`` bad steps in a row stop the
run, because by then the problem (a diverged model, a broken record stream) will not fix itself.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import torch

from mlm.config import Config

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops and points at the last good checkpoint."""


class NonFiniteGuard:
    """Counts skipped non-finite steps and raises :class:`NonFiniteLossError` after too many in a row."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"train.max_nonfinite_steps={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def update(self, finite: bool, step: int, last_checkpoint: str | None = None) -> bool:
        """Record one step; return True when it may be applied, False when it must be skipped."""
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        logger.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
            raise NonFiniteLossError(
                f"stopped at step {step}: {self.consecutive} non-finite steps in a row "
                f"(train.max_nonfinite_steps={self.max_consecutive}); {where}. Try a lower train.lr, "
                "train.mixed_precision=no or bf16 instead of fp16, or check the data for broken images."
            )
        return False

    def state_dict(self) -> dict:
        """Counters for the checkpoint."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters from a checkpoint."""
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks each step; a second signal interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # second signal: the user really wants out now
        self.received = signum
        logger.warning("received %s: saving a checkpoint and stopping after this step", signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: signals stay with their owner
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """True once a stop signal has arrived."""
        return self.received is not None


def oom_advice(config: Config) -> str:
    """The settings to lower after a CUDA out-of-memory error, with their current values."""
    t, m = config.train, config.model
    tips = [f"train.batch_size={t.batch_size} (raise train.grad_accum_steps={t.grad_accum_steps} to keep the batch)"]
    if not t.grad_checkpointing:
        tips.append("train.grad_checkpointing=true")
    if t.mixed_precision == "no":
        tips.append("train.mixed_precision=bf16")
    tips.append(f"model.max_text_len={m.max_text_len} or model.image_size={m.image_size}")
    return "CUDA out of memory; lower " + ", or ".join(tips)


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message says which setting to lower."""


@contextlib.contextmanager
def explain_oom(config: Config) -> Iterator[None]:
    """Re-raise CUDA out-of-memory errors as :class:`OutOfMemory` naming the settings to lower."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise OutOfMemory(f"{oom_advice(config)} ({str(err).splitlines()[0]})") from err
