"""A checkpoint's files: reading its config.json (a broken one is named) and finding a file in a folder or Hub repo."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from mlm.config import Config, ConfigError, config_from_dict
from mlm.errors import first_line


def read_config(path: str | Path) -> Config:
    """A model's config.json; a broken or invalid one is named in the error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


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
