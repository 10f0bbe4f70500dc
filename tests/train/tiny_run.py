"""Helpers for training tests: the tiny model settings and a config that trains it on synthetic data."""

from pathlib import Path

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
