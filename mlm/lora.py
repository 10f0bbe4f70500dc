"""LoRA adapters through PEFT (Hu et al., 2021): inject, freeze the rest, save and load, merge.

PEFT's ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` in place with a LoRA layer (the frozen
``base_layer`` plus trained ``lora_A`` / ``lora_B``), so the model keeps its own class and forward. A model folder
with adapters holds the base weights under their usual names in model.safetensors and the adapters in PEFT's own
files, adapter_config.json and adapter_model.safetensors (loadable by PEFT itself); :func:`merge_lora` folds the
updates into the base weights and puts plain ``nn.Linear`` layers back, which ``mlm export --merge-lora`` saves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether the model carries (unmerged) PEFT adapters."""
    return bool(_tuner_layers(model))


def peft_config(rank: int, alpha: float, dropout: float, target_modules: list[str]):
    """PEFT's LoraConfig for these settings."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")


def lora_settings(model: nn.Module, settings) -> int:
    """Apply ``train.lora`` (a :class:`~mlm.config.LoraSettings`) to ``model``; log and return the trainable count."""
    trained = apply_lora(model, peft_config(settings.rank, settings.alpha, settings.dropout, settings.target_modules))
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: training %d of %d parameters (%.2f%%)", trained, total, 100 * trained / total)
    return trained


def apply_lora(model: nn.Module, config) -> int:
    """Inject adapters of a PEFT LoraConfig into ``model`` and freeze every other weight; return the trainable count.

    A target list that matches no Linear layer raises ValueError naming the list and the names it could match.
    """
    from peft import inject_adapter_in_model

    linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    targets = sorted(config.target_modules or [])
    if not set(targets) & set(linears):
        raise ValueError(f"train.lora.target_modules={targets} names no Linear layer of this model; "
                         f"its Linear layers end in: {', '.join(linears)}")  # fmt: skip
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under their names without adapters (``x.base_layer.weight`` -> ``x.weight``), tied
    tensors once (the first name keeps them)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name.replace(".base_layer.", ".")] = tensor.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, folder: str | Path) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format) into ``folder``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    model.peft_config["default"].save_pretrained(str(folder))
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, config_file: str | Path, weights_file: str | Path) -> None:
    """Inject the adapters an adapter_config.json describes and load their weights; a bad file is named."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        settings = json.loads(Path(config_file).read_text(encoding="utf-8"))
        config = LoraConfig(**_plain_lora(settings))
        apply_lora(model, config)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{config_file}: not a usable LoRA adapter config ({err})") from None
    try:
        weights = load_file(str(weights_file), device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights)
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own types on a misfitting file
        raise ValueError(f"{weights_file}: not adapter weights for {config_file} ({type(err).__name__})") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{weights_file}: the adapter weights do not fit {config_file} "
                         f"(missing {len(missing)}, unexpected {len(result.unexpected_keys)})")  # fmt: skip


MAX_RANK = 4096


def _plain_lora(settings) -> dict:
    """The settings of a plain LoRA adapter (what ``train.lora`` writes); anything else is refused, naming it.

    Initialisations that rewrite the base weights (PiSSA, OLoRA...), DoRA and extra trained modules would make the
    loaded model differ from what the adapter and the absorbed MLA path expect, so they are not loaded.
    """
    if not isinstance(settings, dict) or settings.get("peft_type", "LORA") != "LORA":
        raise ValueError("expected the adapter_config.json of a LoRA adapter")
    rank, targets = settings.get("r"), settings.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"r={rank!r} must be an integer from 1 to {MAX_RANK}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules={targets!r} must be a list of module names")
    for key in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if settings.get(key):
            raise ValueError(f"{key}={settings[key]!r} is not a plain LoRA adapter")
    alpha, dropout = settings.get("lora_alpha", 8), settings.get("lora_dropout", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not isinstance(dropout, (int, float)):
        raise ValueError("lora_alpha and lora_dropout must be numbers")
    return {"r": rank, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": targets,
            "bias": "none", "init_lora_weights": True}  # fmt: skip


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place); the model trains again
    as a whole afterwards."""
    for name, layer in _tuner_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for param in model.parameters():
        param.requires_grad = True
    return model
