"""Post-training dynamic INT8 for CPU inference: torchao, or fbgemm through ``torch.ao.quantization``.

Two engines. ``torchao`` is PyTorch's maintained quantization library (``Int8DynamicActivationInt8WeightConfig``).
``fbgemm`` is ``torch.ao.quantization.quantize_dynamic`` with per-channel weights: deprecated in torch 2.14, but its
kernels run this project's layers about twice as fast on the CPUs we measured (README, "Compression"). With either,
every ``nn.Linear`` gets int8 weights with one scale per output row, and its input is quantized per token when it runs,
except two that stay float: the LM head, whose weight is the token embedding, and MLA's up-projection ``kv_b_proj``,
whose weight the absorbed decode folds into the queries and outputs. Embedding tables (the token embedding, which is
also the LM head), convolution kernels (the patch embedding) and the ``kv_b_proj`` weights are stored as int8 with
one scale per row / output channel and run in float: quantizing rounds them to those values, so the file is small
and the model in memory is the one it holds.

A compressed model is the normal folder plus ``quantization_config.json``; its model.safetensors holds each quantized
weight as ``<layer>.weight.int8`` (int8) and ``<layer>.weight.scale`` (fp32; fbgemm also ``<layer>.weight.zero_point``).
Loading builds the float model, quantizes the listed layers the same way and copies the stored codes and scales in, so a
load gives exactly the model that was saved; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from mlm.compress import ENGINES

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
STORED_LINEAR = ("kv_b_proj",)  # float Linear layers stored as int8 too (the LM head is the token embedding)


def _stored_int8(name: str, module: nn.Module) -> bool:
    return type(module) in STORED_INT8 or (type(module) is nn.Linear and name.rsplit(".", 1)[-1] in STORED_LINEAR)


def embeddings(model: nn.Module) -> list[str]:
    """Names of the layers stored as int8 and run in float: embedding tables, convolutions, ``kv_b_proj``."""
    return [name for name, module in model.named_modules() if _stored_int8(name, module)]


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


ACTIVATIONS = ("symmetric", "asymmetric")  # how torchao quantizes each token's input (asymmetric: after train.qat)


def _quantize_layers(model: nn.Module, names: list[str], engine: str, activations: str = "symmetric") -> None:
    """Swap in the engine's dynamic INT8 for the named Linear layers."""
    wanted = set(names)
    if engine == "fbgemm":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
        for name in names:  # scales rounded to fp32, as the file stores them, so memory and file agree
            module = model.get_submodule(name)
            weight = module.weight()
            scales, zeros = weight.q_per_channel_scales().float().double(), weight.q_per_channel_zero_points()
            module.set_weight_bias(torch._make_per_channel_quantized_tensor(weight.int_repr(), scales, zeros, 0),
                                   module.bias())  # fmt: skip
        return
    logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_notice)  # torchao's import-time registrations
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise ValueError("INT8 with torchao needs it installed: pip install -e '.[compress]'") from None
    from torchao.quantization.quant_primitives import MappingType

    mapping = MappingType.ASYMMETRIC if activations == "asymmetric" else MappingType.SYMMETRIC
    config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping)
    quantize_(model, config, filter_fn=lambda _m, fqn: fqn in wanted)


def quantize_int8(
    model: nn.Module, names: list[str] | None = None, engine: str = "torchao", activations: str = "symmetric"
) -> list[str]:
    """Quantize ``names`` (default: :func:`quantizable`) in place with ``engine`` (torchao, or fbgemm through
    ``torch.ao.quantization``); round the embedding tables to their int8 values; mark the model; return the names.
    ``activations``: torchao's per-token input scheme (``asymmetric`` matches :mod:`mlm.compress.qat`'s training)."""
    if engine not in ENGINES:
        raise ValueError(f"INT8 engine {engine!r}: use one of {', '.join(ENGINES)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"INT8 activations {activations!r}: use one of {', '.join(ACTIVATIONS)}")
    if engine == "fbgemm" and activations != "symmetric":
        raise ValueError("--engine fbgemm quantizes inputs its own way; a QAT model converts with --engine torchao")
    _check_cpu(model)
    names = quantizable(model) if names is None else list(names)
    _quantize_layers(model, names, engine, activations)
    tables = embeddings(model)
    with torch.no_grad():
        for name in tables:
            weight = model.get_submodule(name).weight
            codes, scale = int8_rows(weight)
            weight.copy_((codes.float() * scale).to(weight.dtype))
    model.quantization = {"method": METHOD, "library": engine, "modules": names, "embeddings": tables}
    if activations != "symmetric":
        model.quantization["activations"] = activations
    return names


def is_quantized(model: nn.Module) -> bool:
    """True for a model that :func:`quantize_int8` changed."""
    return getattr(model, "quantization", None) is not None


def parameter_count(model: nn.Module) -> int:
    """Parameters of a float or INT8 model (fbgemm's packed weights and biases included, tied ones once)."""
    total = sum(getattr(p, "qdata", p).numel() for p in model.parameters())
    if is_quantized(model) and model.quantization["library"] == "fbgemm":
        for name in model.quantization["modules"]:
            module = model.get_submodule(name)
            total += module.weight().numel() + (0 if module.bias() is None else module.bias().numel())
    return total


def _layer_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A quantized layer's weight as int8 codes and fp32 per-row scales (fbgemm: also zero points and the bias)."""
    module = model.get_submodule(name)
    if model.quantization["library"] == "fbgemm":
        weight = module.weight()
        out = {"weight.int8": weight.int_repr(), "weight.scale": weight.q_per_channel_scales().float(),
               "weight.zero_point": weight.q_per_channel_zero_points().to(torch.int8)}  # fmt: skip
        if module.bias() is not None:
            out["bias"] = module.bias()
    else:
        out = {"weight.int8": module.weight.qdata, "weight.scale": module.weight.scale.float()}
    return {f"{name}.{key}": t.detach().cpu().contiguous() for key, t in out.items()}


def int8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model's tensors for safetensors: int8 codes and scales for quantized weights, tied tensors once."""
    names = model.quantization["modules"]
    tables = set(model.quantization["embeddings"])
    out = {key: t for name in names for key, t in _layer_tensors(model, name).items()}
    quantized = tuple(f"{n}." for n in names)
    seen = set()
    for name, tensor in model.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if name.startswith(quantized):
            if name.endswith(".bias") and name not in out and isinstance(tensor, torch.Tensor):
                out[name] = tensor.detach().cpu().contiguous()  # torchao keeps the float bias
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
    if data.get("library") not in ENGINES:
        raise ValueError(f"{path}: library must be one of {', '.join(ENGINES)}, got {data.get('library')!r}")
    for field in ("modules", "embeddings"):
        value = data.get(field)
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise ValueError(f"{path}: {field} must be a list of layer names")
    if data.get("activations", "symmetric") not in ACTIVATIONS:
        raise ValueError(f"{path}: activations must be one of {', '.join(ACTIVATIONS)}, got {data['activations']!r}")
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
    fbgemm = config["library"] == "fbgemm"
    codes = {}
    for layer in config["modules"]:
        parts = ("int8", "scale", "zero_point") if fbgemm else ("int8", "scale")
        try:
            codes[layer] = [tensors.pop(f"{layer}.weight.{part}") for part in parts]
        except KeyError:
            raise ValueError(f"{weights}: no int8 weight for {layer!r} listed in {quant_file}") from None
    for table in config["embeddings"]:
        if table not in known or not _stored_int8(table, known[table]):
            raise ValueError(f"{quant_file}: {table!r} is not an embedding, convolution or kv_b_proj of this model")
        try:
            table_codes, scale = tensors.pop(f"{table}.weight.int8"), tensors.pop(f"{table}.weight.scale")
        except KeyError:
            raise ValueError(f"{weights}: no int8 table for {table!r} listed in {quant_file}") from None
        tensors[f"{table}.weight"] = table_codes.float() * scale
    result = model.load_state_dict(tensors, strict=False)
    expected = {f"{m}.weight" for m in config["modules"]} | {"decoder.lm_head.weight"}
    wrong = sorted(set(result.missing_keys) - expected) + sorted(result.unexpected_keys)
    if wrong:
        raise ValueError(f"{weights}: does not fit this config.json ({wrong[0]!r} missing or unexpected)")
    shapes = {layer: tuple(known[layer].weight.shape) for layer in config["modules"]}
    quantize_int8(model, config["modules"], config["library"], config.get("activations", "symmetric"))
    for layer, stored in codes.items():
        if tuple(stored[0].shape) != shapes[layer]:
            raise ValueError(f"{weights}: {layer}.weight is {tuple(stored[0].shape)}, this model's is {shapes[layer]}")
        module = model.get_submodule(layer)
        with torch.no_grad():
            if fbgemm:
                weight = torch._make_per_channel_quantized_tensor(stored[0], stored[1].double(), stored[2].long(), 0)
                module.set_weight_bias(weight, module.bias())
            else:
                module.weight.qdata.copy_(stored[0])
                module.weight.scale.copy_(stored[1].to(module.weight.scale.dtype))
