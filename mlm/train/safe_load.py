"""Checking a checkpoint's state folder before anything in it is loaded: no file may need code to load.

accelerate writes the optimizer, scheduler, grad scaler and RNG states with ``torch.save`` (pickle). A pickle can
name any Python callable, so loading one that came from elsewhere can run code. Every such file must load with
``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only, plus numpy arrays for the RNG
states, as accelerate allows); a file that does not is refused by name before ``accelerator.load_state`` opens it.
The ``.metadata`` file of a sharded (torch.distributed.checkpoint) save is a plain pickle of dataclasses that torch
reads with ``pickle.load``; it is checked with an unpickler that admits only those dataclasses. Its shards
(``.distcp``) hold tensors, which torch reads with ``weights_only=True``, and non-tensor items, which its default
planner reads without the weights-only restriction: every such item named by the metadata is checked with
``weights_only=True`` too. DeepSpeed's ZeRO optimizer files (``zero_pp_rank_*``) may also hold its loss scaler,
stage enum and fragment addresses, three data classes named one by one. Links to folders are refused (a walk
would not follow them, the loader would).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

SAFE_SUFFIXES = {".safetensors", ".json"}  # formats that hold data only
_FILE_SUFFIXES = {".safetensors", ".json", ".bin", ".pkl", ".pt", ".pth", ".distcp"}
DCP_DATA_SUFFIX = ".distcp"  # shards of torch.distributed.checkpoint, checked item by item through .metadata
NEVER_LOADED = {"latest"}  # DeepSpeed's plain-text tag file; scripts (*.py) it copies in are never imported
_DCP_MODULES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.")
_DCP_BUILTINS = {"set", "frozenset", "slice", "complex"}
# a tensor layout looked up by name; paths rebuilt from strings
_DCP_HELPERS = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}  # fmt: skip


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or that cannot be read at all) when loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the dataclasses of a distributed-checkpoint ``.metadata`` file, ``torch.Size`` and dtypes only."""

    def find_class(self, module: str, name: str):
        """Resolve a global only when it is plain data, else refuse."""
        if module == "builtins" and name in _DCP_BUILTINS:
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in _DCP_HELPERS:
            return super().find_class(module, name)
        if module.startswith(_DCP_MODULES):
            found = super().find_class(module, name)
            # classes defined by the checkpoint modules themselves, not anything they happen to import
            own = isinstance(found, type) and found.__module__.startswith(_DCP_MODULES)
            if own and (
                hasattr(found, "__dataclass_fields__") or issubclass(found, tuple) or hasattr(found, "_member_map_")
            ):
                return found  # a dataclass, named tuple or enum
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


# DeepSpeed's ZeRO optimizer files hold three plain-data classes of its own besides tensors
_DEEPSPEED_DATA = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"), ("deepspeed.runtime.zero.config",
                   "ZeroStageEnum"), ("deepspeed.utils.tensor_fragment", "fragment_address"))  # fmt: skip


def _deepspeed_data_classes(path) -> list:
    """The classes of _DEEPSPEED_DATA for a DeepSpeed optimizer file (DeepSpeed installed); else none."""
    import importlib

    if not str(getattr(path, "name", "")).startswith("zero_pp_rank_"):
        return []
    try:
        return [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_DATA]
    except (ImportError, AttributeError):
        return []


def _check_torch_pickle(path) -> None:
    """Load a torch.save file with weights_only=True (accelerate's numpy allowance included)."""
    from accelerate.utils import load

    with torch.serialization.safe_globals(_deepspeed_data_classes(path)):
        load(path, map_location="cpu", weights_only=True)


def _reason(err: Exception) -> str:
    """The informative line of a loader's error (torch puts its generic advice first)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return (useful or lines or [type(err).__name__])[-1 if useful else 0][:200]


def _needs_code(err: Exception) -> bool:
    """True when a weights_only load failed on a global (a callable or class): the pickle wants to run code."""
    text = str(err)
    return isinstance(err, pickle.UnpicklingError) and ("GLOBAL" in text or "global" in text)


def _check_dcp_items(folder: Path, metadata) -> None:
    """Load every non-tensor item of a distributed checkpoint with weights_only=True (torch would not)."""
    import torch.distributed.checkpoint.metadata as dcp

    storage = getattr(metadata, "storage_data", None) or {}
    for index, info in storage.items():
        entry = metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(entry, dcp.BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise pickle.UnpicklingError(f"item {index.fqn!r} is stored with transforms {info.transform_descriptors}")
        shard = (folder / info.relative_path).resolve()
        if shard.parent != folder.resolve():
            raise pickle.UnpicklingError(f"item {index.fqn!r} lives outside the checkpoint ({info.relative_path})")
        with open(shard, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        _check_torch_pickle(io.BytesIO(data))


def check_file(path: str | Path) -> None:
    """Raise UnsafeCheckpointError naming the file when loading it would need code (or it is unreadable)."""
    path = Path(path)
    if path.suffix in SAFE_SUFFIXES or path.suffix == DCP_DATA_SUFFIX or path.suffix == ".py":
        return
    if path.name in NEVER_LOADED:
        return
    try:
        if path.name == ".metadata":
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            _check_dcp_items(path.parent, metadata)
        else:
            _check_torch_pickle(path)
    except Exception as err:  # noqa: BLE001 - a crafted, truncated or random file: name it, never a traceback
        if _needs_code(err):
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it would run code ({_reason(err)}); "
                "only plain data (weights_only=True) is loaded from a checkpoint"
            ) from None
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint file ({_reason(err)})") from None


def check_state_folder(folder: str | Path) -> list[Path]:
    """Check every file under a state folder (see :func:`check_file`); return the files checked, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint state folder not found: {folder}")
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.exists():
            raise UnsafeCheckpointError(f"{path}: a dangling symbolic link in a checkpoint")
        if path.is_symlink() and path.is_dir():
            raise UnsafeCheckpointError(f"{path}: a link to a folder in a checkpoint (its files would go unchecked)")
        if path.is_dir() and path.suffix in _FILE_SUFFIXES:
            raise UnsafeCheckpointError(f"{path}: a folder where a checkpoint file belongs")
        if path.is_dir():
            continue
        if not path.is_file():  # a FIFO or device would block or never end when read
            raise UnsafeCheckpointError(f"{path}: not a regular file (a FIFO, socket or device)")
        check_file(path)
        files.append(path)
    return files
