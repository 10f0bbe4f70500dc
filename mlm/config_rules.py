"""The config's rules, each stated once: allowed choices, bounds on sizes (so that a typo cannot ask for a
zero-sized patch or a terabyte model), list lengths, cross-field rules, and the length of a value shown in a
message (a YAML alias bomb must not become a 30 MB error line).

:func:`check_model` checks a bare :class:`~mlm.config.ModelConfig` (a checkpoint's config.json); :func:`check_run`
checks a whole run config. Every failure is a :class:`ConfigError` naming the field, its value and what is allowed.
"""

from __future__ import annotations

import reprlib

VQA_MODES = ("generative", "rank", "embedding")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CONTRASTIVE_LOSSES = ("infonce", "siglip")
GRAD_COMPRESSION = ("none", "fp16", "bf16", "int8", "int4", "powersgd")
WORD_TARGETS = ("caption", "image", "answers")
LORA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MAX_LIST = 1000  # config lists are short (levels, betas, trackers); longer ones are refused, never walked


def show_value(value: object, limit: int = 80) -> str:
    """repr of a value, cut to limit characters (a YAML alias bomb must not become a 30 MB message)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 6, 6, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type or out of range."""


# (section.field, smallest, largest): sizes are bounded so that a typo cannot ask for terabytes
_RANGES = [
    ("model.dim", 4, 16384), ("model.n_layers", 1, 256), ("model.local_window", 0, 1 << 20),
    ("model.local_window_2d", 1, 1023), ("model.region_size", 1, 1 << 20), ("model.region_size_2d", 1, 1023),
    ("model.top_k", -1, 1 << 20), ("model.routed_tokens", 0, 1 << 20), ("model.mlp_ratio", 0.25, 64),
    ("model.ffn_hidden_dim", 0, 1 << 20),
    ("model.image_size", 1, 8192),
    ("model.patch_size", 1, 1024), ("model.conv_stem", 0, 8), ("model.patch_overlap", 0, 1024),
    ("model.conv_stem_width", 0, 4096), ("model.init_std", 0.0, 1.0),
    ("model.cross_query_gain", 0.0, 100.0), ("model.decoder_short_conv", 0, 64),
    ("model.decoder_grounding", 0, 16),
    ("model.in_chans", 1, 64),
    ("model.vocab_size", 1, 1 << 21), ("model.max_text_len", 4, 1 << 16), ("model.embed_dim", 1, 16384),
    ("model.pool_hidden_dim", 1, 16384), ("model.decoder_layers", 0, 256), ("model.dropout", 0.0, 1.0),
    ("model.mla.n_heads", 1, 1024), ("model.mla.q_lora_rank", 0, 16384), ("model.mla.kv_lora_rank", 1, 16384),
    ("model.mla.qk_nope_head_dim", 1, 4096), ("model.mla.qk_rope_head_dim", 4, 4096),
    ("model.mla.v_head_dim", 1, 4096), ("model.mla.n_kv_heads", 1, 1024),
    ("train.batch_size", 1, 1 << 20), ("train.max_steps", 1, 1 << 40), ("train.grad_accum_steps", 1, 1 << 16),
    ("train.log_every", 1, 1 << 40), ("train.save_every", 0, 1 << 40), ("train.keep_last", 0, 1 << 20),
    ("train.eval_every", 0, 1 << 40), ("train.swap_negatives", 0, 64),
    ("train.vqa_turns", 1, 64), ("train.lr", 0.0, 10.0),
    ("train.max_time_s", 0.0, 1e9), ("train.lora.rank", 0, 4096), ("train.lora.alpha", 1e-6, 1e6),
    ("train.lora.dropout", 0.0, 0.99), ("train.distill.contrastive_weight", 0.0, 1e3),
    ("train.distill.token_weight", 0.0, 1e3), ("train.distill.temperature", 1e-3, 1e3),
    ("train.match_weight", 0.0, 1e3), ("train.exit_weight", 0.0, 1e3),
    ("train.word_weight", 0.0, 1e3), ("train.grad_compression_full_every", 0, 1 << 30),
    ("train.grad_compression_rank", 1, 1024), ("train.grad_compression_start", 0, 1 << 30),
    ("data.cache_images_mb", 0.0, 1 << 24), ("eval.batch_size", 1, 1 << 20), ("eval.chunk_size", 1, 1 << 24),
]  # fmt: skip


def check_ranges(cfg, only: str | None = None, skip: str = "") -> None:
    """Every bounded size within its range, named with its value; ``only="model"`` checks a bare ModelConfig."""
    for name, low, high in _RANGES:
        section, *path = name.split(".")
        if (only is not None and section != only) or section == skip:
            continue
        value = cfg if only is not None else getattr(cfg, section)
        for part in path:
            value = getattr(value, part)
        if not low <= value <= high:
            raise ConfigError(f"{name}={value!r} is out of range; allowed: {low} to {high}")


def model_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the model's choice fields, read from the registries that implement them."""
    from mlm.encoders.patches import IMAGE_POS_EMBED
    from mlm.encoders.pooling import LEVEL_WEIGHT_INIT, POOLING
    from mlm.encoders.sharing import SHARING
    from mlm.layers.level_attention import IMPLS
    from mlm.layers.masks import LEVELS
    from mlm.layers.mla import ATTENTION

    return {"model.attention": tuple(ATTENTION), "model.sharing": tuple(SHARING), "model.pooling": tuple(POOLING),
            "model.level_weight_init": LEVEL_WEIGHT_INIT, "model.image_pos_embed": tuple(IMAGE_POS_EMBED),
            "model.levels": LEVELS, "model.level_impl": IMPLS}  # fmt: skip


def check_model(m) -> None:
    """Check the model's own rules (ranges, choices, cross-field), naming the field, the value and what is allowed."""
    check_ranges(m, only="model")
    allowed = model_choices()
    levels = allowed.pop("model.levels")
    _check_choices({name: (getattr(m, name.split(".")[1]), values) for name, values in allowed.items()})
    for i, level in enumerate(m.levels):
        if level not in levels:
            raise ConfigError(f"model.levels[{i}]={level!r} is not allowed; choose one of {', '.join(levels)}")
    if len(m.levels) != m.n_layers:
        raise ConfigError(f"model.levels has {len(m.levels)} entries but model.n_layers={m.n_layers}")
    if m.cross_level and m.cross_level not in m.levels:
        raise ConfigError(f"model.cross_level={m.cross_level!r} is not in model.levels ({', '.join(m.levels)}); "
                          "'' reads the final states")  # fmt: skip
    if m.decoder_short_conv == 1:
        raise ConfigError("model.decoder_short_conv=1 mixes no tokens: 0 (off) or a kernel of at least 2")
    if m.decoder_grounding and not (m.word_head and m.word_head_patches):
        raise ConfigError(f"model.decoder_grounding={m.decoder_grounding} needs model.word_head and "
                          "model.word_head_patches: true (the per-patch word maps it reads)")  # fmt: skip
    if m.decoder_grounding and m.match_head:
        raise ConfigError(f"model.decoder_grounding={m.decoder_grounding} does not work with model.match_head yet "
                          "(matching decodes captions without their token ids)")  # fmt: skip
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.image_size={m.image_size} is not a multiple of model.patch_size={m.patch_size}")
    if m.local_window_2d % 2 == 0:
        raise ConfigError(f"model.local_window_2d={m.local_window_2d} must be odd")
    side = m.image_size // m.patch_size
    if "routed" in m.levels and m.routed_tokens > side * side:
        raise ConfigError(f"model.routed_tokens={m.routed_tokens} is larger than the sequence: at most {side * side} "
                          f"(patches of a {side}x{side} grid)")  # fmt: skip
    from mlm.layers.sparsity import KeepSchedule  # the layer owns the schedule's rules

    try:
        KeepSchedule.from_config(m.sparsity_schedule)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if (m.image_pos_embed == "sincos" or m.cross_pos_keys or m.cross_pos_values) and m.dim % 4:
        raise ConfigError(f"model.dim={m.dim} must be a multiple of 4 for 2-D sin-cos positions "
                          "(model.image_pos_embed=sincos, model.cross_pos_keys or model.cross_pos_values)")  # fmt: skip
    if m.mla.qk_rope_head_dim % 4:
        raise ConfigError(f"model.mla.qk_rope_head_dim={m.mla.qk_rope_head_dim} must be a multiple of 4 (2-D RoPE)")
    if not isinstance(m.vqa_prompt, str) or m.vqa_prompt.count("{question}") != 1:
        raise ConfigError(f"model.vqa_prompt={show_value(m.vqa_prompt)}: must hold {{question}} once, e.g. "
                          "'question: {question} answer:'")  # fmt: skip
    if m.attention == "gqa" and m.mla.n_heads % m.mla.n_kv_heads:
        raise ConfigError(f"model.mla.n_heads={m.mla.n_heads} is not a multiple of model.mla.n_kv_heads")


def _check_level_sizes(m) -> None:
    """Windows and regions must fit the sequences they apply to (else the level is another one)."""
    side = m.image_size // m.patch_size
    used = set(m.levels)
    fits = [
        ("local" in used, "model.local_window", m.local_window, m.max_text_len - 1, "text tokens after the first"),
        (
            "local" in used or "routed" in used,
            "model.local_window_2d",
            m.local_window_2d,
            2 * side - 1,
            f"neighbourhood side on a {side}x{side} patch grid",
        ),
        ("regional" in used, "model.region_size", m.region_size, m.max_text_len, "text tokens"),
        ("regional" in used, "model.region_size_2d", m.region_size_2d, side, f"side of a {side}x{side} grid"),
    ]
    for applies, name, value, limit, what in fits:
        if applies and value > limit:
            raise ConfigError(f"{name}={value} is larger than the sequence: at most {limit} ({what}); "
                              "a level that sees everything is model.levels: global")  # fmt: skip


def _check_choices(choices: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_run(cfg) -> None:
    """Check a whole run config: the model's rules, then the data, training and evaluation settings."""
    check_model(cfg.model)
    _check_level_sizes(cfg.model)  # for new runs only: saved models with such sizes still load (the level is global)
    check_ranges(cfg, skip="model")
    _check_choices({
        "train.mixed_precision": (cfg.train.mixed_precision, MIXED_PRECISION),
        "train.contrastive_loss": (cfg.train.contrastive_loss, CONTRASTIVE_LOSSES),
        "train.grad_compression": (cfg.train.grad_compression, GRAD_COMPRESSION),
        "train.word_targets": (cfg.train.word_targets, WORD_TARGETS),
        "eval.vqa_mode": (cfg.eval.vqa_mode, VQA_MODES),
    })  # fmt: skip
    t = cfg.train
    if t.swap_negatives and not cfg.data.swap_groups:
        raise ConfigError(f"train.swap_negatives={t.swap_negatives} needs data.swap_groups (groups of words to swap)")
    if t.swap_negatives and t.contrastive_loss != "infonce":
        raise ConfigError(f"train.swap_negatives={t.swap_negatives} only applies to train.contrastive_loss=infonce")
    if cfg.model.word_head_patches and not cfg.model.word_head:
        raise ConfigError("model.word_head_patches needs model.word_head: true (the head it applies per patch)")
    if t.word_weight and not cfg.model.word_head:
        raise ConfigError(f"train.word_weight={t.word_weight} needs model.word_head: true (the head it trains)")
    if t.match_weight and not cfg.model.match_head:
        raise ConfigError(f"train.match_weight={t.match_weight} needs model.match_head: true (the head it trains)")
    if cfg.model.exit_lens and not cfg.model.early_exit:
        raise ConfigError("model.exit_lens=true needs model.early_exit: true (the exits it reads)")
    if t.exit_weight and not cfg.model.early_exit:
        raise ConfigError(f"train.exit_weight={t.exit_weight} needs model.early_exit: true (the exits it trains)")
    if t.lora.rank and not t.lora.target_modules:
        raise ConfigError(f"train.lora.rank={t.lora.rank} needs train.lora.target_modules (names of Linear layers)")
    if t.qat and t.lora.rank:
        raise ConfigError(
            "train.qat with train.lora.rank > 0: INT8 quantizes merged weights; merge, then train with QAT"
        )
