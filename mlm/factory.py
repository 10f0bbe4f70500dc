"""The open_clip contract: ``create_model_and_transforms``, ``get_tokenizer``, ``list_models``.

Code written against ``open_clip`` runs after changing the import: a checkpoint (model, checkpoint or run folder)
or a shipped config name stands where open_clip takes a model name, ``encode_image`` / ``encode_text`` take
``normalize=`` and ``logit_scale`` is a log-scale parameter. A config name gives a fresh, untrained model; its
tokenizer is the one the config names (a WordPiece vocabulary is learned from training data, so a config that asks
for one has no tokenizer until it is trained).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the repository's shipped configs
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def list_models() -> list[str]:
    """Names of the shipped configs, each usable as ``name_or_path`` for a fresh model."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _is_config_name(name_or_path: str) -> bool:
    return name_or_path in list_models() and not Path(name_or_path).exists()


def _config_tokenizer(config):
    """The tokenizer a config names when it is fixed (open_clip's BPE or a tokenizer.json); None for WordPiece."""
    from mlm.data.tokenizer import MLMTokenizer

    if config.data.tokenizer == "wordpiece":
        return None  # learned from the training data
    return MLMTokenizer.from_config(config.data.tokenizer)


def create_model(name_or_path: str, device: str | torch.device | None = None, precision: str | None = None):
    """A trained model from a checkpoint path, or a fresh model of a shipped config name; in eval mode."""
    from mlm.config import load_config
    from mlm.inference import load_model, pick_device
    from mlm.model import MLMModel

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if _is_config_name(name_or_path):
        config = load_config(CONFIG_DIR / f"{name_or_path}.yaml")
        tokenizer = _config_tokenizer(config)
        if tokenizer is not None:
            config.model.vocab_size = tokenizer.vocab_size
        model = MLMModel(config.model, tokenizer, config.eval.decoding())
        model = model.to(pick_device(None if device is None else str(device))).eval()
    elif Path(name_or_path).exists():
        model = load_model(name_or_path, None if device is None else str(device))
    else:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a checkpoint folder nor a shipped config ({', '.join(list_models())})"
        )
    return model.to(PRECISIONS[precision]) if precision else model


def create_model_and_transforms(
    name_or_path: str, device: str | torch.device | None = None, precision: str | None = None
) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, preprocess_train, preprocess_val) as open_clip returns them: PIL image -> (3, H, W) tensors."""
    from mlm.data.transforms import build_transform

    model = create_model(name_or_path, device, precision)
    size = model.config.image_size
    return model, build_transform(size, train=True), build_transform(size, train=False)


class Tokenize:
    """A callable tokenizer: a text or list of texts -> LongTensor (B, context_length), right-padded."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor:
        """Token ids ``[BOS] … [EOS]`` cut to the context length and padded with the pad id to it."""
        length = context_length or self.context_length
        ids, _ = self.tokenizer.encode_batch([texts] if isinstance(texts, str) else list(texts), length)
        padded = torch.full((ids.shape[0], length), self.tokenizer.pad_id, dtype=torch.long)
        padded[:, : ids.shape[1]] = ids
        return padded


def get_tokenizer(name_or_path: str, context_length: int | None = None) -> Tokenize:
    """The tokenizer of a checkpoint (or of a shipped config that names a fixed one) as a callable."""
    from mlm.config import load_config
    from mlm.data.tokenizer import MLMTokenizer
    from mlm.model_files import read_config
    from mlm.run_folder import resolve_checkpoint

    if _is_config_name(name_or_path):
        config = load_config(CONFIG_DIR / f"{name_or_path}.yaml")
        tokenizer, max_len = _config_tokenizer(config), config.model.max_text_len
        if tokenizer is None:
            raise ValueError(
                f"config {name_or_path!r} learns its tokenizer (data.tokenizer={config.data.tokenizer}) from its "
                "training data; give a trained checkpoint instead"
            )
    else:
        folder = resolve_checkpoint(name_or_path)
        tokenizer = MLMTokenizer.from_file(folder / "tokenizer.json")
        max_len = read_config(folder / "config.json").max_text_len
    return Tokenize(tokenizer, context_length or max_len)


def load_clip_benchmark(model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device="cpu"):
    """CLIP_benchmark's model-loader signature: (model, transform, tokenizer) for ``model_name`` (a checkpoint or a
    shipped config), or for ``pretrained`` when that names a checkpoint; ``cache_dir`` is unused (no downloads)."""
    source = pretrained if pretrained and Path(pretrained).exists() else model_name
    model, _, preprocess = create_model_and_transforms(source, device=device)
    if model.tokenizer is None:
        return model, preprocess, get_tokenizer(source)  # raises: this config learns its tokenizer from data
    return model, preprocess, Tokenize(model.tokenizer, model.config.max_text_len)  # not read from disk again


def register_clip_benchmark() -> None:
    """Make ``clip_benchmark.models.load_clip("mlm", ...)`` (and its CLI's ``--model_type mlm``) load mlm models."""
    from clip_benchmark import models

    models.TYPE2FUNC["mlm"] = load_clip_benchmark
    if "mlm" not in models.MODEL_TYPES:
        models.MODEL_TYPES.append("mlm")
