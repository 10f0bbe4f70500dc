"""Helpers for training tests: the tiny model settings and a config that trains it on synthetic data."""

from pathlib import Path

from tiny_checkpoint import TINY_MODEL

from mlm.config import Config, load_config


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
