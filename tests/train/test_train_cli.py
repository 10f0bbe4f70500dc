"""``mlm train`` as a user runs it: a SIGTERM'd run exits cleanly, and ``accelerate launch`` runs 2 CPU processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_config

from mlm.model import MLMModel
from mlm.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent


def _config_file(synth_dir, run_dir, *overrides) -> Path:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    tiny_config(synth_dir, run_dir, *overrides).save(path)
    return path


def _accelerate(*args: str) -> list[str]:
    """``accelerate launch`` on a free port: back-to-back launches must not race for the default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [str(VENV_BIN / "accelerate"), "launch", "--main_process_port", str(port), *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigterm_exits_zero_with_a_loadable_checkpoint(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = _config_file(synth_dir, run_dir, "train.max_steps=100000", "train.trackers=[csv, tensorboard]")
    proc = subprocess.Popen([sys.executable, "-m", "mlm.cli", "train", "--config", str(config)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run_dir / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") > 10:  # a few steps logged: training is running
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "interrupted:" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 100000
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest.name == f"step_{summary['steps']:06d}"
    assert MLMModel.from_pretrained(latest / "model").tokenizer is not None
    assert any((run_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard through accelerate's tracker


def test_accelerate_launch_two_cpu_processes(synth_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    config = _config_file(synth_dir, run_dir, "train.max_steps=4", "train.batch_size=4", "train.save_every=2")
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA, mlm train runs the processes' DDP on CPU (gloo).
    launch = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1")
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launch, "-m", "mlm.cli", "train", "--config", str(config)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8 and summary["steps"] == 4
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]
    assert MLMModel.from_pretrained(run_dir / "checkpoints" / "step_000004" / "model") is not None


def _launch(config_file: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = _accelerate("--config_file", config_file, "--num_processes", "2")
    cmd += ["--mixed_precision", "no", "-m", "mlm.cli", "train", "--config", str(config), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500)


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_shipped_sharded_configs_train_save_and_resume_exactly_on_cpu(engine, synth_dir, tmp_path):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    config_file = str(Path(__file__).parents[2] / "configs" / "accelerate" / f"{engine}.yaml")
    sets = ("train.max_steps=4", "train.batch_size=4", "train.save_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = _launch(config_file, _config_file(synth_dir, straight, *sets))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["distributed"] == {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[engine]  # not a silent DDP run
    assert summary["processes"] == 2 and summary["steps"] == 4
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = ckpt.checkpoints_root(straight) / "step_000002"
    subprocess.run(["cp", "-r", str(step2), str(resumed / "checkpoints")], check=True)
    result = _launch(config_file, _config_file(synth_dir, resumed, *sets), "--resume", "latest")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = load_file(ckpt.checkpoints_root(straight) / "step_000004" / "model" / "model.safetensors")
    b = load_file(ckpt.checkpoints_root(resumed) / "step_000004" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted, bit for bit


@pytest.mark.parametrize("mode", ["int4", "powersgd"])
def test_compressed_gradients_resume_exactly_and_log_their_bytes(mode, synth_dir, tmp_path):
    from safetensors.torch import load_file

    launch = _accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1")
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mlm.cli", "train"]
    sets = ("train.max_steps=6", "train.batch_size=4", "train.save_every=3", f"train.grad_compression={mode}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = subprocess.run([*launch, "--config", str(_config_file(synth_dir, straight, *sets))], env=_env(),
                            capture_output=True, text=True, timeout=500)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    step3 = ckpt.checkpoints_root(straight) / "step_000003"
    assert sorted(p.name for p in step3.glob("process_tensors_*")) == [
        f"process_tensors_{r}.safetensors" for r in (0, 1)
    ]
    (resumed / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(step3), str(resumed / "checkpoints")], check=True)
    cmd = [*launch, "--config", str(_config_file(synth_dir, resumed, *sets)), "--resume", "latest"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a = load_file(ckpt.checkpoints_root(straight) / "step_000006" / "model" / "model.safetensors")
    b = load_file(ckpt.checkpoints_root(resumed) / "step_000006" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # residuals / PowerSGD factors restored, buckets re-laid out
    rows = [line.split(",") for line in (straight / "metrics.csv").read_text().splitlines()[1:]]
    sent = [float(value) for _, name, value in rows if name == "grad_bytes_per_step"]
    fp32 = 4 * sum(p.numel() for p in MLMModel.from_pretrained(step3 / "model").parameters())
    assert len(sent) == 6 and 0 < sent[-1] < fp32 / 4  # compressed steps send a fraction of the fp32 gradient
