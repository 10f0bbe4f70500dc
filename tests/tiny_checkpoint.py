"""A tiny trained checkpoint for the model-facing tests (evaluation, the predict commands, the demo).

Trained once per test session with the real training API (30 steps on 40 synthetic 32-pixel scenes, ~5 s);
tests/conftest.py exposes it as the session fixture ``tiny_run`` (run and synth folders) and the model as
``tiny_model``.
"""

from pathlib import Path

import torch

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


def build(base: Path) -> tuple[Path, Path]:
    """(run folder, synth folder) under base, trained on the first call and reused afterwards."""
    from mlm.config import load_config
    from mlm.data.synthetic import generate
    from mlm.train.loop import train

    run, synth = base / "run", base / "synth"
    if (run / "summary.json").is_file():
        return run, synth
    generate(synth, n_images=40, size=32, seed=0)
    sets = [f"data.train={synth}", f"train.output_dir={run}", "train.batch_size=8", "train.warmup_steps=2",
            "train.lr=3e-3", "train.max_steps=30", "train.save_every=0", "train.trackers=[csv]",
            "train.mixed_precision='no'", "eval.batch_size=8"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread than with two busy cores fighting
    try:
        train(load_config(None, TINY_MODEL + sets))
    finally:
        torch.set_num_threads(threads)
    return run, synth
