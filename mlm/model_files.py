"""A checkpoint's files: its config.json and generation_config.json (a broken one is named), finding a file in a
folder or Hub repo, and loading the weights.

config.json holds the model's own settings (:class:`~mlm.config.ModelConfig`, ``"format": 2``). Checkpoints written
before that held the whole run config (``{"model": ..., "data": ..., "train": ..., "eval": ...}``): their model
section is the model config and their eval section gives the decoding defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from mlm.config import ConfigError, ModelConfig, model_config_from_dict
from mlm.errors import first_line
from mlm.generation import DecodingConfig

FORMAT = 2  # config.json holds the ModelConfig alone
CONFIG_KEYS = ("model_type", "format")  # written beside the model settings, not part of them
DECODING_KEYS = ("max_new_tokens", "num_beams", "top_p")  # what a format-1 eval section says about decoding


def read_json_object(path: str | Path) -> dict:
    """A JSON file that must hold an object; a broken one is named with the reason."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_run_config(data: dict) -> bool:
    """Whether a config.json is the format-1 kind (the whole run config, model settings under "model")."""
    return isinstance(data.get("model"), dict)


def model_config(data: dict | ModelConfig, where: str = "config") -> ModelConfig:
    """A ModelConfig from a config.json's dict of either format; a bad field is named with ``where``."""
    if isinstance(data, ModelConfig):
        return data
    settings = data["model"] if is_run_config(data) else {k: v for k, v in data.items() if k not in CONFIG_KEYS}
    try:
        return model_config_from_dict(settings)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_config(path: str | Path) -> ModelConfig:
    """A checkpoint's model settings from its config.json (either format); a broken or invalid one is named."""
    path = Path(path)
    return model_config(read_json_object(path), str(path))


def config_json(config: ModelConfig) -> dict:
    """What config.json holds: the model settings, marked with their format."""
    return {"model_type": "mlm", "format": FORMAT, **dataclasses.asdict(config)}


def read_decoding(config_path: str | Path, generation_path: str | Path | None) -> DecodingConfig:
    """The saved decoding defaults: generation_config.json, else a format-1 config.json's eval section, else none."""
    if generation_path is not None:
        return DecodingConfig.from_dict(read_json_object(Path(generation_path)), str(generation_path))
    data = read_json_object(Path(config_path))
    section = data.get("eval") if is_run_config(data) else None
    if not isinstance(section, dict):
        return DecodingConfig()
    return DecodingConfig.from_dict({k: section[k] for k in DECODING_KEYS if k in section}, f"{config_path}: eval")


def resolve_file(model_id: str, filename: str, hub_kwargs: dict, required: bool = True) -> str | None:
    """Return the local path of filename in a checkpoint folder or Hub repo; None (or raise) when it is absent."""
    if os.path.isdir(model_id):
        path = Path(model_id) / filename
        if path.is_file():
            return str(path)
        if required:
            raise FileNotFoundError(f"{path} not found; a checkpoint folder holds config.json and model.safetensors")
        return None
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"{filename} not found in Hub repo {model_id}") from None
        return None


def load_weights(model, weights: str | Path, strict: bool = True, device: str = "cpu") -> None:
    """Load a model.safetensors into ``model``; a truncated, random or misfitting file is named in one line."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(weights), strict=strict, device=device)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types on truncated or random files
        raise ValueError(f"{weights}: not usable weights for this config.json ({first_line(err)})") from None


def load_model_weights(model, model_id: str, hub_kwargs: dict, strict: bool, device: str) -> None:
    """Load a folder's model.safetensors into ``model``: plain weights, or INT8 codes when the folder holds
    quantization_config.json (:mod:`mlm.compress.int8`, CPU only)."""
    from mlm.compress import int8

    weights = resolve_file(model_id, constants.SAFETENSORS_SINGLE_FILE, hub_kwargs)
    quantized = resolve_file(model_id, int8.QUANT_FILE, hub_kwargs, required=False)
    if quantized is not None:
        int8.load_int8(model, weights, quantized)
    else:
        load_weights(model, weights, strict=strict, device=device)


def scalar_logits_as_vectors(state_dict, prefix, *_args) -> None:
    """Checkpoints written before FSDP support hold logit_scale and logit_bias as 0-d tensors."""
    for name in ("logit_scale", "logit_bias"):
        value = state_dict.get(prefix + name)
        if value is not None and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)
