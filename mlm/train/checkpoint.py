"""Checkpoints: atomic saves, keep-last-K pruning and ``latest`` resolution.

Layout of one checkpoint, ``<output_dir>/checkpoints/step_000123/``:

- ``model/``   -- ``MLMModel.save_pretrained`` (config.json, generation_config.json, model.safetensors,
  tokenizer.json): a model you can load with ``MLMModel.from_pretrained`` and no other file;
- ``state/``   -- ``accelerator.save_state``: optimizer, scheduler, grad scaler and RNG states of every process;
- ``trainer_state.json`` -- the trainer's own state (step, time, skip counters) and the run config;
- ``trainer_tensors.safetensors`` -- the trainer's tensors, when it has any (the hard-negative sampler's embeddings);
- ``process_tensors_<rank>.safetensors`` -- each process's own tensors (the compressed-gradient hook's residuals).

Nothing in a checkpoint needs code to load: before resuming, every pickle-based file under ``state/`` is checked to
load with ``weights_only=True`` (:mod:`mlm.train.safe_load`) and a file that would not is refused by name.

A save is written into ``.tmp_step_000123/`` and renamed into place only when complete, so a process killed while
saving leaves the previous checkpoint intact; leftover temporary folders are removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlm.errors import first_line
from mlm.lora import apply_lora, has_lora
from mlm.run_folder import (  # noqa: F401 - the layout is re-exported for the training code and its tests
    MODEL_DIR,
    PROCESS_TENSORS,
    STATE_DIR,
    TRAINER_STATE,
    TRAINER_TENSORS,
    checkpoints_root,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
)
from mlm.train.safe_load import check_state_folder

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp_"
_LEGACY_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # trainer state as a pickle, written before 0.2


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Turn ``--resume latest|DIR`` into a checkpoint folder (None: start fresh).

    Refuses to start where the run's folder already holds later checkpoints than the starting point: their step
    numbers would collide with the new run's saves, and pruning would keep the old ones instead of the new.
    """
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting from scratch", checkpoints_root(output_dir))
        return path
    path = Path(resume) if resume else None
    if path is not None and (not (path / TRAINER_STATE).is_file() or not (path / STATE_DIR).is_dir()):
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint folder (expected {TRAINER_STATE} and {STATE_DIR}/ inside, "
            f"e.g. {checkpoints_root(output_dir) / 'step_000100'})"
        )
    start = int(read_trainer_state(path)["step"]) if path is not None else 0
    later = [p.name for step, p in list_checkpoints(output_dir) if step > start]
    if later:
        raise ValueError(
            f"{checkpoints_root(output_dir)} already holds checkpoints after step {start} ({', '.join(later)}); "
            "continue with --resume latest, or move them away, or set another train.output_dir"
        )
    return path


def _remove_stale_temporaries(root: Path) -> None:
    for path in root.glob(f"{_TMP_PREFIX}*"):
        logger.info("removing unfinished checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all); return the deleted folders."""
    if keep_last <= 0:
        return []
    old = [path for _, path in list_checkpoints(output_dir)[:-keep_last]]
    for path in old:
        shutil.rmtree(path)
    return old


def _full_model(accelerator, model):
    """The bare model with all its weights on the main process (gathered first when FSDP/DeepSpeed shard them)."""
    from accelerate.utils import DistributedType

    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return bare
    state_dict = accelerator.get_state_dict(model)  # a collective: every process calls it
    if not accelerator.is_main_process:
        return None
    # a CPU copy to hold the gathered weights
    full = type(bare)(bare.config, tokenizer=bare.tokenizer, generation_config=bare.generation_config)
    if has_lora(bare):
        apply_lora(full, bare.peft_config["default"])
    full.load_state_dict(state_dict)
    return full


def _fsync_tree(root: Path, recursive: bool = True) -> None:
    """Flush a folder (and with recursive, every file and folder under it) to disk."""
    paths = sorted(root.rglob("*")) if recursive else []
    for path in [*paths, root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    accelerator,
    model,
    output_dir: str | Path,
    step: int,
    trainer_state: dict,
    keep_last: int,
    tensors: dict[str, torch.Tensor] | None = None,
    process_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model, accelerate state, trainer state (JSON), trainer tensors and this process's own tensors
    (safetensors) for ``step`` atomically; every process must call this."""
    root = checkpoints_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if final.exists():
        return final  # already saved at this step (e.g. a periodic save right before the final one)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR))
    pretrained = _full_model(accelerator, model)
    if accelerator.is_main_process:
        pretrained.save_pretrained(tmp / MODEL_DIR)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if tensors:
            _write_tensors(tensors, tmp / TRAINER_TENSORS)
    if process_tensors:
        _write_tensors(process_tensors, tmp / PROCESS_TENSORS.format(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)  # a crash right after the rename must not find truncated files under the new name
        os.replace(tmp, final)  # the atomic step: before it the old checkpoints are the newest complete ones
        _fsync_tree(root, recursive=False)
        deleted = prune_checkpoints(output_dir, keep_last)
        logger.info("saved checkpoint %s%s", final, f" (removed {len(deleted)} old)" if deleted else "")
    accelerator.wait_for_everyone()
    return final


def _legacy_tensors(state: Path) -> dict[str, torch.Tensor]:
    """Tensors of a trainer state pickled by an older mlm (already checked to load with weights_only=True)."""
    from accelerate.utils import load

    found = {}
    for path in sorted(p for p in state.iterdir() if _LEGACY_CUSTOM.match(p.name)):
        found.update({k: v for k, v in load(path, map_location="cpu", weights_only=True).items()
                      if isinstance(v, torch.Tensor)})  # fmt: skip
    return found


def load_checkpoint(accelerator, checkpoint: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the accelerate state (model, optimizer, scheduler, scaler, RNG) after checking that no file needs
    code to load; return the trainer state and the trainer tensors."""
    checkpoint = Path(checkpoint)
    state = checkpoint / STATE_DIR
    check_state_folder(state)
    trainer_state = read_trainer_state(checkpoint)
    tensors_file = checkpoint / TRAINER_TENSORS
    tensors = _read_tensors(tensors_file) if tensors_file.exists() else _legacy_tensors(state)
    legacy = [p for p in state.iterdir() if _LEGACY_CUSTOM.match(p.name)]
    if not legacy:
        _load_state(accelerator, state, state)
        return trainer_state, tensors
    # accelerate would load the old pickle itself, without the weights-only restriction: give it a view without it
    with tempfile.TemporaryDirectory(prefix="mlm-resume-") as view:
        for path in state.iterdir():
            if path not in legacy:
                os.symlink(path.resolve(), Path(view) / path.name)
        _load_state(accelerator, Path(view), state)
    return trainer_state, tensors


def load_process_tensors(checkpoint: str | Path, process_index: int) -> dict[str, torch.Tensor]:
    """This process's own tensors of a checkpoint; empty when it has none."""
    path = Path(checkpoint) / PROCESS_TENSORS.format(process_index)
    return _read_tensors(path) if path.is_file() else {}


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors (moved to the CPU, contiguous) as a safetensors file."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a broken one is named in one line."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types on a broken file
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def _load_state(accelerator, folder: Path, shown: Path) -> None:
    """accelerator.load_state, with a broken or mismatched state reported in one line naming the folder."""
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types on a file that does not fit
        raise ValueError(f"{shown}: cannot restore the training state ({first_line(err)})") from None
