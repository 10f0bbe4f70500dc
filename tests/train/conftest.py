"""Fixtures for training tests: a small synthetic dataset on disk."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """40 synthetic 32-pixel scenes (train/val/test/compositional splits) written by mlm.data.synthetic."""
    from mlm.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_images=40, size=32, seed=0)
    return out
