"""Fixtures for training tests: a small synthetic dataset on disk and one intra-op thread."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """40 synthetic 32-pixel scenes (train/val/test/compositional splits) written by mlm.data.synthetic."""
    from mlm.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_images=40, size=32, seed=0)
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run several times faster than with threads fighting for 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
