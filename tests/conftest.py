"""Test-wide settings: offline hub, CPU threads, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture
def realdata() -> Path:
    """Path to ../shared/realdata (real COCO photos and a VQAv2 sample); fails loudly when absent."""
    if not REALDATA.is_dir():
        raise FileNotFoundError(f"real data folder not found at {REALDATA} (it ships beside the repo as shared/)")
    return REALDATA


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tests' tiny matmuls run several times slower with threads on busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run folder, synth folder): 30 training steps of the tiny model on 40 synthetic scenes."""
    import tiny_checkpoint

    return tiny_checkpoint.build(tmp_path_factory.getbasetemp() / "tiny-checkpoint")


@pytest.fixture
def tiny_model(tiny_run):
    """A fresh copy of the tiny trained model, loaded from its checkpoint."""
    from mlm.inference import load_model

    return load_model(tiny_run[0], "cpu")
