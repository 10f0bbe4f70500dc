"""Checkpoints: layout, keep-last-K, latest resolution, and atomicity when a save dies half-way."""

import multiprocessing
import os
import signal

import pytest
import torch
from tiny_run import TINY_MODEL

from mlm.config import load_config
from mlm.model import MLMModel
from mlm.train import checkpoint as ckpt
from mlm.train.schedule import build_optimizer, build_scheduler


def _prepared(output_dir):
    from accelerate import Accelerator

    config = load_config(None, [*TINY_MODEL, f"train.output_dir={output_dir}"])
    accelerator = Accelerator(cpu=True)
    model = MLMModel(config.model)
    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model


def _save(accelerator, model, output_dir, step, keep_last=2):
    return ckpt.save_checkpoint(accelerator, model, output_dir, step, {"step": step}, keep_last)


def test_layout_keep_last_and_latest(tmp_path):
    accelerator, model = _prepared(tmp_path)
    assert ckpt.resolve_resume(tmp_path, "latest") is None  # nothing yet: a fresh start
    for step in (1, 2, 3):
        with torch.no_grad():
            model.logit_bias.fill_(float(step))
        path = _save(accelerator, model, tmp_path, step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert ckpt.resolve_resume(tmp_path, "latest") == path == tmp_path / "checkpoints" / "step_000003"
    assert ckpt.read_trainer_state(path) == {"step": 3}
    assert {p.name for p in (path / "state").iterdir()} >= {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
    loaded = MLMModel.from_pretrained(path / "model")
    assert loaded.logit_bias.item() == 3.0
    got, ref = loaded.state_dict(), model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoints"))


def test_starting_before_existing_checkpoints_is_refused(tmp_path):
    accelerator, model = _prepared(tmp_path)
    for step in (2, 4):
        _save(accelerator, model, tmp_path, step, keep_last=0)
    older = tmp_path / "checkpoints" / "step_000002"
    with pytest.raises(ValueError, match=r"already holds checkpoints after step 2 \(step_000004\).*--resume latest"):
        ckpt.resolve_resume(tmp_path, str(older))
    with pytest.raises(ValueError, match=r"after step 0 \(step_000002, step_000004\)"):
        ckpt.resolve_resume(tmp_path, None)
    assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints" / "step_000004"


def test_files_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    accelerator, model = _prepared(tmp_path)
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    _save(accelerator, model, tmp_path, 1)
    tmp = tmp_path / "checkpoints" / ".tmp_step_000001"
    assert str(tmp / "model" / "model.safetensors") in synced and str(tmp / "trainer_state.json") in synced
    assert synced[-1] == str(tmp_path / "checkpoints")  # the rename itself, flushed


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator, model = _prepared(tmp_path)
    good = _save(accelerator, model, tmp_path, 5)

    def crash(self, directory):
        os.makedirs(directory)
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(MLMModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(accelerator, model, tmp_path, 6)
    assert (tmp_path / "checkpoints" / ".tmp_step_000006").is_dir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert MLMModel.from_pretrained(good / "model") is not None
    monkeypatch.undo()
    _save(accelerator, model, tmp_path, 7)  # the next save clears the leftover
    assert not (tmp_path / "checkpoints" / ".tmp_step_000006").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 7]


def _save_then_get_killed(output_dir):
    accelerator, model = _prepared(output_dir)
    _save(accelerator, model, output_dir, 1)

    def die(self, directory):
        os.makedirs(directory)
        (directory / "model.safetensors").write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)

    MLMModel.save_pretrained = die
    _save(accelerator, model, output_dir, 2)


@pytest.mark.slow
def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    child = multiprocessing.get_context("spawn").Process(target=_save_then_get_killed, args=(tmp_path,))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / ".tmp_step_000002").is_dir()
    latest = ckpt.resolve_resume(tmp_path, "latest")
    assert latest.name == "step_000001"
    assert MLMModel.from_pretrained(latest / "model").config.dim == 32
