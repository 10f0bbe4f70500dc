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


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"step": -100, "elapsed_s": 1.0, "nonfinite": {}}', "'step' must be a non-negative integer"),
    ('{"step": 2, "elapsed_s": null, "nonfinite": {}}', "'elapsed_s' must be a non-negative number"),
    ('{"step": 2, "elapsed_s": 1.0, "nonfinite": "x"}', "'nonfinite' must map counter names"),
    ('{"step": 2, "elapsed_s": 1.0, "nonfinite": {}, "config": {"model": "x"}}', "'config' must be an object"),
])  # fmt: skip
def test_a_broken_trainer_state_is_named(synth_dir, tmp_path, content, message):
    config, latest = _saved_run(synth_dir, tmp_path / "run")
    (latest / "trainer_state.json").write_text(content)
    with pytest.raises(ValueError, match=rf"step_000002/trainer_state.json: {message}"):
        Trainer(config, resume=str(latest))


def test_broken_tensors_fifos_and_folders_in_a_checkpoint_are_named(synth_dir, tmp_path):
    config, latest = _saved_run(synth_dir, tmp_path / "run")
    (latest / "trainer_tensors.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(ValueError, match=r"trainer_tensors.safetensors: not a readable safetensors file"):
        Trainer(config, resume="latest")
    (latest / "trainer_tensors.safetensors").unlink()
    optimizer = latest / "state" / "optimizer.bin"
    optimizer.unlink()
    os.mkfifo(optimizer)  # would block accelerate's read forever
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer.bin: not a regular file"):
        Trainer(config, resume="latest")
    optimizer.unlink()
    optimizer.mkdir()
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer.bin: a folder where a checkpoint file belongs"):
        Trainer(config, resume="latest")
    optimizer.rmdir()
    weights = latest / "state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"step_000002/state: cannot restore the training state"):
        Trainer(config, resume="latest")


def test_a_linked_checkpoint_folder_is_not_a_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "trainer_state.json").write_text('{"step": 1}')
    root.mkdir()
    (root / "step_000001").symlink_to(tmp_path / "elsewhere")
    assert ckpt.list_checkpoints(tmp_path) == []
    assert ckpt.prune_checkpoints(tmp_path, 1) == [] and (tmp_path / "elsewhere").is_dir()


def test_a_payload_inside_a_sharded_checkpoint_item_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    with pytest.warns(UserWarning):
        dcp.save({"w": torch.randn(2, 2), "extra": _Payload(marker)}, checkpoint_id=str(tmp_path / "bad"))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused: loading it would run code"):
        check_state_folder(tmp_path / "bad")
    assert not marker.exists()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "shards").symlink_to(tmp_path / "bad", target_is_directory=True)
    with pytest.raises(UnsafeCheckpointError, match="a link to a folder"):
        check_state_folder(tmp_path / "state")


def test_deepspeed_optimizer_files_admit_its_three_data_classes_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "fp32": torch.ones(3)}
    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(state, good)
    check_file(good)  # what ZeRO-2 writes loads as data
    torch.save(state, tmp_path / "optimizer.bin")
    with pytest.raises(UnsafeCheckpointError, match="optimizer.bin: refused"):
        check_file(tmp_path / "optimizer.bin")  # the allowance holds for DeepSpeed's own files only
    marker = tmp_path / "pwned"
    _crafted(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: refused"):
        check_file(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not marker.exists()
