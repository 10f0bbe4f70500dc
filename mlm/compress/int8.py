"""Post-training dynamic INT8 for CPU inference, through torchao.

torchao is PyTorch's maintained quantization library (``torch.ao.quantization``'s dynamic path warns that it is
deprecated in torch 2.14). Every ``nn.Linear`` gets int8 weights with one scale per output row, and its input is
quantized per token when it runs (``Int8DynamicActivationInt8WeightConfig``), except two that stay float: the LM
head, whose weight is the token embedding, and MLA's up-projection ``kv_b_proj``, whose weight the absorbed decode
folds into the queries and outputs. Embedding tables (the token embedding, which is also the LM head) and
convolution kernels (the patch embedding) are stored as int8 with one scale per row / output channel and run in
float: quantizing rounds them to those values, so the file is small and the model in memory is the one it holds.

A compressed model is the normal folder plus ``quantization_config.json``; its model.safetensors holds each
quantized weight as ``<layer>.weight.int8`` (int8) and ``<layer>.weight.scale`` (fp32). Loading builds the float
model, quantizes the listed layers the same way and copies the stored codes and scales in, so a load gives exactly
the model that was saved; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

QUANT_FILE = "quantization_config.json"
METHOD = "int8_dynamic"
KEEP_FLOAT = ("lm_head", "kv_b_proj")  # module names (last part) that stay float


def quantizable(model: nn.Module) -> list[str]:
    """Names of the model's Linear layers that INT8 quantizes; ValueError for layers it cannot (LoRA)."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight"):
            raise ValueError(f"{name}: LoRA layers cannot be quantized; merge them first (mlm export --merge-lora)")
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP_FLOAT:
            names.append(name)
    return names


STORED_INT8 = (nn.Embedding, nn.Conv2d)  # stored as int8, run in float


def embeddings(model: nn.Module) -> list[str]:
    """Names of the model's embedding tables and convolutions (stored as int8, run in float)."""
    return [name for name, module in model.named_modules() if type(module) in STORED_INT8]


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes shaped like ``weight`` (R, ...) and one fp32 scale per row (R, 1, ...)."""
    w = weight.detach().float()
    scale = w.flatten(1).abs().amax(dim=1).clamp(min=1e-12).view(-1, *[1] * (w.dim() - 1)) / 127.0
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def _drop_enum_notice(record: logging.LogRecord) -> bool:
    """False for torch's notice that an Enum torchao registers needs no registration (nothing a user can do)."""
    return "is an Enum subclass" not in record.getMessage()


def _check_cpu(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"INT8 is for CPU inference; the model is on {device} (load it on the CPU)")


def quantize_int8(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Quantize ``names`` (default: :func:`quantizable`) in place; returns the names and marks the model."""
    logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_notice)  # torchao's import-time registrations
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise ValueError("INT8 models need torchao: pip install -e '.[compress]'") from None

    _check_cpu(model)
    names = quantizable(model) if names is None else list(names)
    wanted = set(names)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _m, fqn: fqn in wanted)
    tables = embeddings(model)
    with torch.no_grad():
        for name in tables:
            weight = model.get_submodule(name).weight
            codes, scale = int8_rows(weight)
            weight.copy_((codes.float() * scale).to(weight.dtype))
    model.quantization = {"method": METHOD, "library": "torchao", "modules": names, "embeddings": tables}
    return names


def is_quantized(model: nn.Module) -> bool:
    """True for a model that :func:`quantize_int8` changed."""
    return getattr(model, "quantization", None) is not None


def int8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model's tensors for safetensors: int8 codes and scales for quantized weights, tied tensors once."""
    names = set(model.quantization["modules"])
    tables = set(model.quantization["embeddings"])
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in names and name.endswith(".weight"):
            out[f"{name}.int8"] = tensor.qdata.detach().cpu().contiguous()
            out[f"{name}.scale"] = tensor.scale.detach().float().cpu().contiguous()
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue  # the LM head is the token embedding
        seen.add(key)
        if layer in tables and name.endswith(".weight"):
            out[f"{name}.int8"], out[f"{name}.scale"] = (t.cpu().contiguous() for t in int8_rows(tensor))
        else:
            out[name] = tensor.detach().cpu().contiguous()
    return out


def save_int8(model: nn.Module, folder: Path, weights: str) -> None:
    """Write model.safetensors (``weights``) and quantization_config.json of a quantized model."""
    from safetensors.torch import save_file

    save_file(int8_state_dict(model), weights, metadata={"format": "pt", "quantization": METHOD})
    (folder / QUANT_FILE).write_text(json.dumps(model.quantization, indent=2))


def read_quantization(path: str | Path) -> dict:
    """The quantization_config.json of a compressed model, checked; ValueError naming the file and field."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable quantization config ({err})") from None
    if not isinstance(data, dict) or data.get("method") != METHOD:
        raise ValueError(
            f"{path}: method must be {METHOD!r}, got {data.get('method') if isinstance(data, dict) else data!r}"
        )
    for field in ("modules", "embeddings"):
        value = data.get(field)
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise ValueError(f"{path}: {field} must be a list of layer names")
    return data


def load_int8(model: nn.Module, weights: str | Path, quant_file: str | Path) -> None:
    """Load a compressed model.safetensors into the float ``model``, quantizing the layers the config lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_quantization(quant_file)
    known = dict(model.named_modules())
    missing = [m for m in config["modules"] if type(known.get(m)) is not nn.Linear]
    if missing:
        raise ValueError(f"{quant_file}: {missing[0]!r} is not a Linear layer of this model (another model's file?)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not usable weights ({str(err).splitlines()[0]})") from None
    codes = {}
    for layer in config["modules"]:
        try:
            codes[layer] = tensors.pop(f"{layer}.weight.int8"), tensors.pop(f"{layer}.weight.scale")
        except KeyError:
            raise ValueError(f"{weights}: no int8 weight for {layer!r} listed in {quant_file}") from None
    for table in config["embeddings"]:
        if type(known.get(table)) not in STORED_INT8:
            raise ValueError(f"{quant_file}: {table!r} is not an embedding or convolution of this model")
        try:
            codes_, scale = tensors.pop(f"{table}.weight.int8"), tensors.pop(f"{table}.weight.scale")
        except KeyError:
            raise ValueError(f"{weights}: no int8 table for {table!r} listed in {quant_file}") from None
        tensors[f"{table}.weight"] = codes_.float() * scale
    result = model.load_state_dict(tensors, strict=False)
    expected = {f"{m}.weight" for m in config["modules"]} | {"decoder.lm_head.weight"}
    wrong = sorted(set(result.missing_keys) - expected) + sorted(result.unexpected_keys)
    if wrong:
        raise ValueError(f"{weights}: does not fit this config.json ({wrong[0]!r} missing or unexpected)")
    quantize_int8(model, config["modules"])
    for layer, (qdata, scale) in codes.items():
        weight = known[layer].weight
        if weight.qdata.shape != qdata.shape or weight.scale.shape != scale.shape:
            raise ValueError(
                f"{weights}: {layer}.weight has shape {tuple(qdata.shape)}, expected {tuple(weight.qdata.shape)}"
            )
        with torch.no_grad():
            weight.qdata.copy_(qdata)
            weight.scale.copy_(scale.to(weight.scale.dtype))
