"""Fixtures for training tests: a small synthetic dataset on disk and a tiny model config around it."""

from pathlib import Path

import pytest
import torch

from mlm.config import Config, load_config

TINY_MODEL = [
    "model.dim=32",
    "model.n_layers=2",
    "model.levels=[local, global]",
    "model.image_size=32",
    "model.patch_size=8",
    "model.max_text_len=24",
    "model.embed_dim=32",
    "model.pool_hidden_dim=16",
    "model.decoder_layers=1",
    "model.mla.n_heads=2",
    "model.mla.kv_lora_rank=16",
    "model.mla.qk_nope_head_dim=8",
    "model.mla.qk_rope_head_dim=4",
    "model.mla.v_head_dim=8",
    "data.vocab_size=200",
]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """40 synthetic 32-pixel scenes (train/val/test/compositional splits) written by mlm.data.synthetic."""
    from mlm.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_images=40, size=32, seed=0)
    return out


def tiny_config(synth_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """The tiny model on the synthetic data, CSV logging only, no periodic saves."""
    sets = [
        *TINY_MODEL,
        f"data.train={synth_dir}",
        f"train.output_dir={output_dir}",
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.log_every=1",
        "train.save_every=0",
        "train.trackers=[csv]",
        *overrides,
    ]
    return load_config(None, sets)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run several times faster than with threads fighting for 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
