"""Fine-tuning: start a run from a trained model's weights and tokenizer (``train.init_from`` / ``--init-from``).

Unlike ``--resume``, nothing of the old run's optimizer, schedule, data order or step count is kept: the run trains
the given model on its own data with a fresh optimizer and schedule. The model settings must match the
checkpoint's (the weights would not fit otherwise); a mismatch names every differing field. Words of the new data
that the checkpoint's vocabulary cannot spell are counted and reported, as they reach the model as [UNK].
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

from mlm.config import Config, ConfigError, ModelConfig
from mlm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_lora

logger = logging.getLogger(__name__)


def model_differences(saved: dict, current: ModelConfig) -> list[str]:
    """``model.<field>: old -> new`` for each model setting that differs (a field the saved dict lacks counts as
    its default, so checkpoints written before a setting existed still compare equal)."""
    now, defaults = asdict(current), asdict(ModelConfig())
    return [
        f"model.{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in now.items() if saved.get(k, defaults[k]) != v
    ]


def init_folder(config: Config) -> Path:
    """The model folder that ``train.init_from`` names (a model, checkpoint or run folder)."""
    from mlm.run_folder import resolve_checkpoint

    return resolve_checkpoint(config.train.init_from)


def folder_tokenizer(folder: Path, option: str):
    """The tokenizer.json of a model folder; a missing one is named with the option that chose the folder."""
    from mlm.data.tokenizer import MLMTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{option}: {folder} has no tokenizer.json")
    return MLMTokenizer.from_file(folder / "tokenizer.json")


def load_tokenizer(config: Config):
    """The checkpoint's tokenizer, which the fine-tuning run keeps (its ids are what the weights know)."""
    return folder_tokenizer(init_folder(config), f"--init-from {config.train.init_from}")


def report_new_words(tokenizer, texts) -> dict[str, int]:
    """Count the distinct words of ``texts`` that the tokenizer can only write as [UNK]; log one line."""
    words = {w for text in texts for w in re.findall(r"[^\W_]+(?:'[^\W_]+)?", text.lower())}  # punctuation apart
    unknown = {w for w in words if tokenizer.cannot_spell(w)}
    logger.info("init-from: %d of %d distinct words of the training text are not in the model's vocabulary ([UNK])%s",
                len(unknown), len(words), f", e.g. {', '.join(sorted(unknown)[:5])}" if unknown else "")  # fmt: skip
    return {"words": len(words), "unknown": len(unknown)}


def load_weights(model, config: Config) -> None:
    """Copy the checkpoint's weights into ``model`` after checking that the model settings match."""
    from mlm.model_files import load_weights as load_file
    from mlm.model_files import read_config

    folder = init_folder(config)
    differences = model_differences(asdict(read_config(folder / "config.json")), config.model)
    if differences:
        raise ConfigError(f"--init-from {config.train.init_from}: the model settings differ from the checkpoint's: "
                          + "; ".join(differences))  # fmt: skip
    load_file(model, folder / "model.safetensors")
    if (folder / ADAPTER_CONFIG).is_file():  # a LoRA-trained model starts the run with its adapters merged in
        load_adapter(model, folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS)
        merge_lora(model)
    logger.info("init-from: weights and tokenizer of %s", folder)
