"""Configuration: nested dataclasses, YAML loading and type-checked ``--set a.b=value`` overrides.

The resolved :class:`Config` is written into every run folder and checkpoint, so a checkpoint rebuilds its model
with no other file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlm.config_rules import LORA_TARGETS, MAX_LIST, ConfigError, check_model, check_run
from mlm.config_rules import show_value as _show

RETIRED = {"data.synth_images", "data.synth_size", "data.synth_seed", "data.synth_holdout"}  # never read; ignored
logger = logging.getLogger(__name__)


@dataclass
class MLAConfig:
    """Attention settings; names follow DeepSeek-V2/V3 (``n_heads``, ``kv_lora_rank``, ...)."""

    n_heads: int = 4
    q_lora_rank: int = 0  # 0 = plain W_Q, no query compression
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_kv_heads: int = 2  # only for attention: gqa
    rope_theta: float = 10000.0


@dataclass
class ModelConfig:
    """Shape of the shared encoder, pooling, projection and multimodal decoder."""

    attention: str = "mla"  # mla | mha | gqa
    dim: int = 128
    n_layers: int = 4
    levels: list[str] = field(default_factory=lambda: ["local", "local", "regional", "global"])
    local_window: int = 16  # tokens each side a text token may see in a local block
    local_window_2d: int = 3  # side of the square patch neighbourhood in a local block (odd)
    region_size: int = 4  # text tokens per region
    region_size_2d: int = 2  # side of a square patch region
    top_k: int = 0  # keys kept per query in global blocks; 0 = dense, -1 = length-adaptive (sparsity_schedule)
    # [short_len, keep_short, long_len, keep_long]: share of keys a routed block (routed_tokens 0) or an adaptive
    # top-k keeps, log-linear in the length between (the seeds: 80% up to 256 tokens, 20% from 1,024)
    sparsity_schedule: list[float] = field(default_factory=lambda: [256, 0.8, 1024, 0.2])
    routed_tokens: int = 0  # keys a routed block selects per image (plus each patch's window); 0 = length-adaptive
    level_impl: str = "auto"  # dense (boolean masks) | sparse (skip masked work) | auto (sparse from 256 tokens) | flex
    sharing: str = "full"  # full | norms (per-modality norms) | ffn (per-modality FFN experts) | none (two towers)
    pooling: str = "hierarchical"  # hierarchical (per-level attention pooling) | mean (mean of the last block)
    level_weight_init: str = "ramp"  # ramp (0.1 lowest level -> 1.0 highest) | uniform (all 1.0)
    init_std: float = 0.0  # Linear weights ~ truncated normal(0, init_std), biases 0 (timm / HF); 0 = torch's own
    mlp_ratio: float = 4.0
    ffn_hidden_dim: int = 0  # SwiGLU width; 0 = from mlp_ratio (a pruned model states its own: mlm compress)
    image_size: int = 64
    patch_size: int = 8
    conv_stem: int = 0  # 3x3 convs before the patch projection (early convolutions; stride 2 while the patch allows)
    conv_stem_width: int = 0  # channels of the stem's last conv (each one before has half); 0 = dim / 2
    patch_overlap: int = 0  # pixels of the neighbouring patches each patch projection also sees (each side)
    image_pos_embed: str = "sincos"  # absolute patch positions added to the embeddings: sincos | learned | none
    in_chans: int = 3
    vocab_size: int = 1000  # replaced by the tokenizer's size when a run starts
    max_text_len: int = 32
    vqa_prompt: str = "question: {question} answer:"  # what the decoder reads before an answer; {question} once
    embed_dim: int = 128  # the shared image-text space
    pool_hidden_dim: int = 64
    decoder_layers: int = 2
    cross_pos_keys: bool = False  # cross-attention keys carry each patch's position in their RoPE dims
    word_head: bool = False  # a linear head on the pooled image embedding over the vocabulary (train.word_weight)
    word_head_patches: bool = False  # the word head scores every patch; a word's logit is its best patch's (MIL)
    cross_pos_values: bool = False  # the image tokens the decoder reads get a learned projection of their position
    cross_query_gain: float = 0.0  # > 0: each cross-attention head's queries get a learned gain starting here
    cross_null: bool = False  # the decoder's cross-attention can attend to a learned "nothing here" token
    decoder_short_conv: int = 0  # > 1: a causal depthwise conv over this many text states at the decoder's input
    decoder_grounding: int = 0  # > 0: heads that read where the per-patch word head sees the recent words
    cross_level: str = ""  # the level whose patch states the decoder and the word head read; "" = the final ones
    early_exit: bool = False  # halting gates after each image block: easy images stop early (--exit-threshold)
    exit_lens: bool = False  # each exit maps its states to an estimate of the final ones (a tuned lens; early_exit)
    match_head: bool = False  # a match / no-match head on the decoder (image-text matching, train.match_weight)
    dropout: float = 0.0
    norm_eps: float = 1e-6
    mla: MLAConfig = field(default_factory=MLAConfig)


@dataclass
class DataConfig:
    """Where records come from and how they become tensors."""

    train: str = ""  # a source: file or folder (see mlm.data.sources)
    val: str = ""
    test: str = ""
    format: str = "auto"  # auto | coco | karpathy | vqav2 | csv | jsonl | imagefolder | parquet | arrow | webdataset
    image_root: str = ""  # base folder for relative image paths; default: beside the annotation file
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    tokenizer: str = "wordpiece"  # wordpiece (trained on the training text) | openclip | path/to/tokenizer.json
    vocab_size: int = 2000
    strict: bool = False  # fail on the first bad record instead of skipping and counting it
    num_workers: int = 0
    augment: bool = True
    max_image_pixels: int = 89_478_485  # decompression-bomb guard, PIL's default
    # MB of decoded, transformed images kept in memory when the transform has no randomness (no augmentation); 0 = off
    cache_images_mb: float = 0.0
    swap_groups: list[list[str]] = field(default_factory=list)  # interchangeable words for train.swap_negatives


@dataclass
class LoraSettings:
    """LoRA fine-tuning through PEFT (Hu et al., 2021): frozen weights plus trained low-rank updates of the
    ``target_modules`` (Linear layers named by the end of their path)."""

    rank: int = 0  # 0 = off: every weight trains
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DistillSettings:
    """Knowledge distillation from a trained teacher (``mlm distill``, :mod:`mlm.train.distill`)."""

    teacher: str = ""  # a model, checkpoint or run folder; "" = off
    contrastive_weight: float = 1.0  # KL between the teacher's and the student's image-text similarity softmaxes
    token_weight: float = 1.0  # KL between their caption / answer token distributions at the temperature
    temperature: float = 2.0  # of the token distributions (the loss is scaled by its square, Hinton et al.)


@dataclass
class TrainConfig:
    """Optimisation, objectives, checkpoints and logging."""

    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 64
    max_steps: int = 1000
    max_time_s: float = 0.0  # stop after this many seconds of training; 0 = no limit
    fit_steps_to_time: bool = False  # end the cosine at the steps that fit max_time_s (timed early)
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    grad_accum_steps: int = 1
    clip_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    grad_checkpointing: bool = False
    grad_compression: str = "none"  # DDP gradients as none | fp16 | bf16 | int8 | int4 | powersgd (train/comm.py)
    grad_compression_full_every: int = 0  # int8/int4: every N-th step in full precision; 0 = never
    grad_compression_rank: int = 4  # powersgd: the rank of the low-rank approximation
    grad_compression_start: int = 0  # steps sent in full precision before compression starts (powersgd: >= 2)
    grad_compression_error_feedback: bool = True  # int8/int4: send later what rounding dropped (off: for ablation)
    compile: bool = False
    qat: bool = False  # fake INT8 in the layers mlm compress --int8 quantizes (mlm/compress/qat.py)
    deterministic: bool = False
    contrastive_loss: str = "infonce"  # infonce | siglip
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    vqa_weight: float = 1.0
    word_weight: float = 0.0  # predict the caption's words from the pooled image (SuperClass); needs model.word_head
    # caption: the row's caption | image: all its image's captions, VQA rows too | answers: image's, plus the answers
    # of its questions that name a thing (not yes/no, not counts): questions alone then teach the word head
    word_targets: str = "caption"
    exit_weight: float = 0.0  # model.early_exit: contrastive loss of every exit's embedding (its gates always train)
    match_weight: float = 0.0  # image-text matching through the decoder with hard negatives; needs model.match_head
    hard_negative_strength: float = 0.0
    hard_negative_sampler: bool = False
    swap_negatives: int = 0  # captions per caption row with one word swapped (data.swap_groups), as extra negatives
    vqa_turns: int = 1  # questions about the same image packed into one VQA row, as conversation turns
    vqa_contrastive: bool = False  # VQA rows join the contrastive loss, their question-answer text as the caption
    vqa_fraction: float = 0.5  # share of VQA records in every batch when the data has both kinds; -1 = as they come
    vqa_same_images: bool = False  # VQA rows ask about the caption rows' images (each encoded once)
    local_loss: bool = False
    init_from: str = ""  # fine-tune: a trained model/checkpoint/run folder's weights and tokenizer start the run
    lora: LoraSettings = field(default_factory=LoraSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0
    max_nonfinite_steps: int = 5
    trackers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])


@dataclass
class EvalConfig:
    """Evaluation and decoding settings."""

    batch_size: int = 64
    chunk_size: int = 1024
    max_new_tokens: int = 20
    num_beams: int = 1
    top_p: float = 0.0  # > 0 switches decoding to nucleus sampling
    vqa_mode: str = "generative"  # generative | rank | embedding (no fusion: pooled image vs "question answer" text)
    max_samples: int = 0  # 0 = all
    vqa_shuffled: bool = False  # answer every question again about another image: what the image adds per type

    @classmethod
    def from_decoding(cls, decoding) -> EvalConfig:
        """Default evaluation settings that decode as a model's saved :class:`~mlm.generation.DecodingConfig`."""
        return cls(max_new_tokens=decoding.max_new_tokens, num_beams=decoding.num_beams, top_p=decoding.top_p)

    def decoding(self):
        """These decoding settings as the :class:`~mlm.generation.DecodingConfig` a model saves as its defaults."""
        from mlm.generation import DecodingConfig

        return DecodingConfig(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, top_p=self.top_p)


@dataclass
class Config:
    """The whole run: model, data, training and evaluation settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain nested dicts and lists."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Return the config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (or JSON when the name ends in .json)."""
        path = Path(path)
        if path.suffix == ".json":
            import json

            path.write_text(json.dumps(self.to_dict(), indent=2))
        else:
            path.write_text(self.to_yaml())


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return value converted to type tp, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        if len(value) > MAX_LIST:
            raise ConfigError(f"{where}: a list of {len(value):,} items; the limit is {MAX_LIST:,}")
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {_show(value)} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    raise AssertionError(f"unsupported config type {tp} at {where}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass cls from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if name in RETIRED:
            logger.warning("config key '%s' is no longer used and was ignored", name)
            continue
        if key not in hints:
            raise ConfigError(f"unknown config key '{name}'; valid keys: {', '.join(valid)}{_closest(key, valid)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value or {}, name)
        else:
            kwargs[key] = _check_value(value, tp, name)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (unknown keys and wrong types raise ConfigError)."""
    cfg = _from_dict(Config, data, "")
    check_run(cfg)
    return cfg


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Build and validate a ModelConfig (a checkpoint's config.json) from a dict, naming a bad field."""
    m = _from_dict(ModelConfig, data, "model")
    check_model(m)
    return m


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data[a][b][c] = value for dotted 'a.b.c', checking each key against the dataclass fields."""
    cls: Any = Config
    node = data
    parts = dotted.split(".")
    for depth, key in enumerate(parts):
        valid = [f.name for f in dataclasses.fields(cls)]
        where = ".".join(parts[: depth + 1])
        if key not in valid:
            raise ConfigError(f"unknown config key '{where}'; valid keys: {', '.join(valid)}{_closest(key, valid)}")
        tp = typing.get_type_hints(cls)[key]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                first = dataclasses.fields(tp)[0].name
                raise ConfigError(f"'{where}' is a section; set one of its keys, e.g. {where}.{first}")
            node[key] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{where}' is not a section, so '{dotted}' does not exist")
        node = node.setdefault(key, {})
        cls = tp


def _parse_value(raw: str) -> Any:
    """A ``--set`` value read as YAML (numbers, lists, true/false); text that is not YAML stays the text itself."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError):
        return raw  # e.g. data.train=*.json (a YAML alias) or data.train=@list


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), _parse_value(raw))
    return data


def _blame(path: Path | None, data: dict[str, Any], overrides: list[str]) -> str:
    """Where a failing config goes wrong: the file itself, or the first ``--set`` after which it fails."""
    try:
        config_from_dict(copy.deepcopy(data))
    except ConfigError:
        return str(path) if path is not None else "config"
    for n in range(1, len(overrides) + 1):
        try:
            config_from_dict(apply_overrides(copy.deepcopy(data), overrides[:n]))
        except ConfigError:
            return f"--set {overrides[n - 1]}"
    return "--set " + " --set ".join(overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply ``--set`` overrides.

    An error names its source: the file when the file alone is wrong, else the first ``--set`` that makes it wrong.
    """
    data: dict[str, Any] = {}
    overrides = list(overrides or [])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    final = copy.deepcopy(data)
    for item in overrides:
        try:
            apply_overrides(final, [item])  # checks the key path
        except ConfigError as err:
            raise ConfigError(f"--set {item}: {err}") from err
    try:
        return config_from_dict(final)
    except ConfigError as err:
        raise ConfigError(f"{_blame(path, data, overrides)}: {err}") from err
