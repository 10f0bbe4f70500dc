"""Fixtures: a tiny trained checkpoint with its synthetic data (built once per session by tests/tiny_checkpoint.py)."""

import pytest
import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run folder, synth folder): 30 training steps of the tiny model on 40 synthetic scenes."""
    return tiny_checkpoint.build(tmp_path_factory.getbasetemp() / "tiny-checkpoint")


@pytest.fixture
def tiny_model(tiny_run):
    """A fresh copy of the tiny trained model, loaded from its checkpoint."""
    from mlm.eval.inference import load_model

    return load_model(tiny_run[0], "cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tiny model's small matmuls run several times slower with threads on busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
