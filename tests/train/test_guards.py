"""Non-finite step counting, SIGTERM as a stop flag, and the out-of-memory message."""

import os
import signal

import pytest
import torch

from mlm.config import Config
from mlm.train.guards import NonFiniteGuard, NonFiniteLossError, OutOfMemory, StopSignal, explain_oom


def test_nonfinite_guard_counts_and_resets_then_stops_with_the_checkpoint():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.update(True, step=1)
    assert not guard.update(False, step=2)
    assert not guard.update(False, step=3)
    assert guard.update(True, step=4)  # a good step resets the run of bad ones
    assert (guard.skipped, guard.consecutive) == (2, 0)
    assert not guard.update(False, step=5)
    assert not guard.update(False, step=6)
    with pytest.raises(NonFiniteLossError, match=r"step 7: 3 non-finite steps in a row.*step_000004"):
        guard.update(False, step=7, last_checkpoint="runs/x/checkpoints/step_000004")
    assert guard.skipped == 5
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped, restored.consecutive) == (5, 3)


def test_nonfinite_guard_rejects_a_zero_limit():
    with pytest.raises(ValueError, match="train.max_nonfinite_steps=0"):
        NonFiniteGuard(0)


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_out_of_memory_names_the_settings_to_lower():
    config = Config()
    config.train.batch_size = 256
    with pytest.raises(OutOfMemory, match=r"lower train.batch_size=256 .*train.grad_checkpointing=true"):
        with explain_oom(config):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
