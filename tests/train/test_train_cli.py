"""``mlm train`` as a user runs it: a SIGTERM'd run exits cleanly, and ``accelerate launch`` runs 2 CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import tiny_config

from mlm.model import MLMModel
from mlm.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent


def _config_file(synth_dir, run_dir, *overrides) -> Path:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    tiny_config(synth_dir, run_dir, *overrides).save(path)
    return path


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
    launch = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launch, "-m", "mlm.cli", "train", "--config", str(config)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8 and summary["steps"] == 4
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]
    assert MLMModel.from_pretrained(run_dir / "checkpoints" / "step_000004" / "model") is not None
