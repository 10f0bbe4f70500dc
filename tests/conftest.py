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
