"""Resuming never runs code from the run folder: crafted pickles are refused by name, plain data still loads."""

import os
import pickle

import pytest
import torch
from tiny_run import tiny_config

from mlm.train import checkpoint as ckpt
from mlm.train.loop import Trainer
from mlm.train.safe_load import UnsafeCheckpointError, check_file, check_state_folder

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this creates the marker file (stands for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path, marker):
    torch.save({"step": 1, "payload": _Payload(marker)}, path)


def test_a_crafted_pickle_is_refused_by_name_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scaler.pt"):
        _crafted(tmp_path / name, marker)
        with pytest.raises(UnsafeCheckpointError, match=rf"{name}: refused: loading it would run code"):
            check_file(tmp_path / name)
    (tmp_path / "plain.pickle").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="plain.pickle: refused"):
        check_file(tmp_path / "plain.pickle")
    assert not marker.exists()


def test_plain_data_passes_and_broken_files_are_named(tmp_path):
    import numpy as np

    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}, tmp_path / "optimizer.bin")
    torch.save({"numpy_random_seed": np.random.get_state(), "torch_manual_seed": torch.get_rng_state()},
               tmp_path / "random_states_0.pkl")  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"not checked here: safetensors holds data only")
    assert len(check_state_folder(tmp_path)) == 3
    (tmp_path / "scheduler.bin").write_bytes(os.urandom(64))
    with pytest.raises(UnsafeCheckpointError, match=r"scheduler.bin: not a readable checkpoint file"):
        check_state_folder(tmp_path)


def test_sharded_checkpoint_metadata_is_checked_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):  # no process group: dcp saves as one process
        dcp.save({"model": {"w": torch.randn(3, 4)}, "step": 3}, checkpoint_id=str(tmp_path / "ok"))
    assert {p.name for p in check_state_folder(tmp_path / "ok")} == {".metadata", "__0_0.distcp"}
    marker = tmp_path / "pwned"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused.*posix.system|\.metadata: refused"):
        check_state_folder(tmp_path / "bad")
    assert not marker.exists()


def _saved_run(synth_dir, run_dir):
    config = tiny_config(synth_dir, run_dir, "train.max_steps=2", "train.save_every=1")
    Trainer(config).fit()
    return config, ckpt.latest_checkpoint(run_dir)


def test_resume_refuses_a_crafted_state_file_and_runs_nothing(synth_dir, tmp_path):
    config, latest = _saved_run(synth_dir, tmp_path / "run")
    assert not list((latest / "state").glob("custom_checkpoint_*"))  # the trainer state is JSON now
    marker = tmp_path / "pwned"
    _crafted(latest / "state" / "random_states_0.pkl", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"step_000002/state/random_states_0.pkl: refused"):
        Trainer(config, resume="latest")
    assert not marker.exists()


def test_an_old_checkpoint_with_a_plain_trainer_pickle_still_resumes(synth_dir, tmp_path):
    config, latest = _saved_run(synth_dir, tmp_path / "run")
    grouping = torch.randn(5, 4)
    # the layout older runs wrote: accelerate's custom_checkpoint_0.pkl holding the trainer state
    torch.save({"step": 2, "elapsed_s": 1.5, "nonfinite": {"skipped": 0, "consecutive": 0}, "grouping": grouping},
               latest / "state" / "custom_checkpoint_0.pkl")  # fmt: skip
    trainer = Trainer(config, resume="latest")
    assert trainer.state.step == 2 and torch.equal(trainer.state.grouping, grouping)
    assert (latest / "state" / "custom_checkpoint_0.pkl").is_file()  # the user's files are left as they were
