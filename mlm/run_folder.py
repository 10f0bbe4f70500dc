"""The layout of a run folder and of its checkpoints, and finding the model folder in either.

``<output_dir>/checkpoints/step_000123/`` holds ``model/`` (a model folder: config.json, generation_config.json,
model.safetensors, tokenizer.json), ``state/`` (accelerate's optimizer, scheduler and RNG states),
``trainer_state.json`` (step, time, counters and the run config), ``trainer_tensors.safetensors`` and, with
compressed gradients, ``process_tensors_<rank>.safetensors``. Reading this
layout needs nothing of the training code, so loading a model for inference does not import it; saving, pruning and
resuming live in :mod:`mlm.train.checkpoint`.
"""

from __future__ import annotations

import re
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_DIR = "model"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_tensors.safetensors"
PROCESS_TENSORS = "process_tensors_{}.safetensors"  # per process: the compressed-gradient hook's residuals


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
        # real folders only: a link could point anywhere, and pruning would have to delete through it
        if match and path.is_dir() and not path.is_symlink() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_trainer_state(checkpoint: str | Path) -> dict:
    """The readable trainer state of a checkpoint, checked: step, time and counters of the right types."""
    from mlm.model_files import read_json_object

    path = Path(checkpoint) / TRAINER_STATE
    state = read_json_object(path)
    step, elapsed, nonfinite = state.get("step"), state.get("elapsed_s", 0.0), state.get("nonfinite", {})
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{path}: 'step' must be a non-negative integer, got {step!r}")
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not 0 <= elapsed < float("inf"):
        raise ValueError(f"{path}: 'elapsed_s' must be a non-negative number, got {elapsed!r}")
    counts = nonfinite.values() if isinstance(nonfinite, dict) else [None]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise ValueError(f"{path}: 'nonfinite' must map counter names to non-negative integers, got {nonfinite!r}")
    if "config" in state and not (isinstance(state["config"], dict) and isinstance(state["config"].get("model"), dict)):
        raise ValueError(f"{path}: 'config' must be an object with a 'model' section")
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """The model folder for a model folder, a training checkpoint ``step_*`` folder or a run folder (latest step)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    latest = latest_checkpoint(path)
    if latest is not None and (latest / MODEL_DIR / "config.json").is_file():
        return latest / MODEL_DIR
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a model folder (config.json + model.safetensors), a checkpoint folder "
        f"(step_*/model/) or a run folder with checkpoints/; train one with `mlm train` (or `make demo`)"
    )


def run_config(model_folder: str | Path) -> dict | None:
    """The run config saved beside a checkpoint's model folder (``step_*/trainer_state.json``), or None."""
    step = Path(model_folder).parent
    if not (step / TRAINER_STATE).is_file():
        return None
    return read_trainer_state(step).get("config")


def check_new_folder(out: str | Path, what: str = "") -> Path:
    """``out`` as a Path; FileExistsError (naming ``what`` or the path) when it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{what or out}: already exists and is not an empty folder; choose a new one")
    return out


def write_folder(out: str | Path, fill) -> Path:
    """Have ``fill(tmp)`` write a folder beside ``out`` under a temporary name, then rename it to ``out`` (new or
    empty), so a failure leaves nothing half-written."""
    import os
    import shutil

    out = check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
