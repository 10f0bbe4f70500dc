"""Bounds on the config: sizes (so that a typo cannot ask for a zero-sized patch or a terabyte model), list lengths
and the length of a value shown in a message (a YAML alias bomb must not become a 30 MB error line).

Checked by :func:`mlm.config.config_from_dict` with the other rules; a value out of range is named with its bounds.
"""

from __future__ import annotations

import reprlib

MAX_LIST = 1000  # config lists are short (levels, betas, trackers); longer ones are refused, never walked


def show_value(value: object, limit: int = 80) -> str:
    """repr of a value, cut to limit characters (a YAML alias bomb must not become a 30 MB message)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 6, 6, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RangeError(ValueError):
    """A config value outside its allowed range (turned into a ConfigError by the config module)."""


# (section.field, smallest, largest): sizes are bounded so that a typo cannot ask for terabytes
_RANGES = [
    ("model.dim", 4, 16384), ("model.n_layers", 1, 256), ("model.local_window", 0, 1 << 20),
    ("model.local_window_2d", 1, 1023), ("model.region_size", 1, 1 << 20), ("model.region_size_2d", 1, 1023),
    ("model.top_k", 0, 1 << 20), ("model.mlp_ratio", 0.25, 64), ("model.image_size", 1, 8192),
    ("model.patch_size", 1, 1024), ("model.conv_stem", 0, 8), ("model.in_chans", 1, 64),
    ("model.vocab_size", 1, 1 << 21), ("model.max_text_len", 4, 1 << 16), ("model.embed_dim", 1, 16384),
    ("model.pool_hidden_dim", 1, 16384), ("model.decoder_layers", 0, 256), ("model.dropout", 0.0, 1.0),
    ("model.mla.n_heads", 1, 1024), ("model.mla.q_lora_rank", 0, 16384), ("model.mla.kv_lora_rank", 1, 16384),
    ("model.mla.qk_nope_head_dim", 1, 4096), ("model.mla.qk_rope_head_dim", 4, 4096),
    ("model.mla.v_head_dim", 1, 4096), ("model.mla.n_kv_heads", 1, 1024),
    ("train.batch_size", 1, 1 << 20), ("train.max_steps", 1, 1 << 40), ("train.grad_accum_steps", 1, 1 << 16),
    ("train.log_every", 1, 1 << 40), ("train.save_every", 0, 1 << 40), ("train.keep_last", 0, 1 << 20),
    ("train.eval_every", 0, 1 << 40), ("train.swap_negatives", 0, 64),
    ("train.vqa_turns", 1, 64), ("train.lr", 0.0, 10.0),
    ("train.max_time_s", 0.0, 1e9),
    ("eval.batch_size", 1, 1 << 20), ("eval.chunk_size", 1, 1 << 24),
]  # fmt: skip


def check_ranges(cfg) -> None:
    """Every bounded size within its range, named with its value."""
    for name, low, high in _RANGES:
        section, *path = name.split(".")
        value = getattr(cfg, section)
        for part in path:
            value = getattr(value, part)
        if not low <= value <= high:
            raise RangeError(f"{name}={value!r} is out of range; allowed: {low} to {high}")
