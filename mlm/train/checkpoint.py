"""Checkpoints: atomic saves, keep-last-K pruning and ``latest`` resolution.

Layout of one checkpoint, ``<output_dir>/checkpoints/step_000123/``:

- ``model/``   -- ``MLMModel.save_pretrained`` (config.json, model.safetensors, tokenizer.json): a model you can load
  with ``MLMModel.from_pretrained`` and no other file;
- ``state/``   -- ``accelerator.save_state``: optimizer, scheduler, grad scaler, RNG states of every process and the
  registered trainer state (step, data position, skip counters);
- ``trainer_state.json`` -- the same trainer state, readable.

A save is written into ``.tmp_step_000123/`` and renamed into place only when complete, so a process killed while
saving leaves the previous checkpoint intact; leftover temporary folders are removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"
MODEL_DIR = "model"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"


def checkpoints_root(output_dir: str | Path) -> Path:
    """The folder that holds a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; temporary folders are ignored."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


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


def read_trainer_state(checkpoint: str | Path) -> dict:
    """The readable trainer state of a checkpoint."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


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
    full = type(bare)(bare.config, tokenizer=bare.tokenizer)  # a CPU copy to hold the gathered weights
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


def save_checkpoint(accelerator, model, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Save model, accelerate state and trainer state for ``step`` atomically; every process must call this."""
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)  # a crash right after the rename must not find truncated files under the new name
        os.replace(tmp, final)  # the atomic step: before it the old checkpoints are the newest complete ones
        _fsync_tree(root, recursive=False)
        deleted = prune_checkpoints(output_dir, keep_last)
        logger.info("saved checkpoint %s%s", final, f" (removed {len(deleted)} old)" if deleted else "")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | Path) -> dict:
    """Restore the accelerate state (model, optimizer, scheduler, scaler, RNG, registered objects); return the
    readable trainer state."""
    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint / STATE_DIR))
    return read_trainer_state(checkpoint)
