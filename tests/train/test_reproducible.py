"""Two fresh ``mlm train`` runs of one config are identical (tokenizer, every logged loss, final weights), and a run
stopped early and resumed ends where an uninterrupted one does. Each run is its own process, as a user runs it."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_config

from mlm.train import checkpoint as ckpt
from mlm.train.tracking import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def _train(*config_paths, extra=()):
    """Run `mlm train` on each config at once (one thread each: independent processes, so still deterministic)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mlm.cli", "train", "--config", str(path), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for path in config_paths
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
        results.append((stdout, stderr))
    return results


def _config(synth_dir, run_dir, *overrides):
    path = run_dir.parent / f"{run_dir.name}.yaml"
    tiny_config(synth_dir, run_dir, f"train.max_steps={STEPS}", "train.save_every=3", *overrides).save(path)
    return path


def _losses(run_dir):
    return {name: dict(series) for name, series in read_metrics(run_dir / "metrics.csv").items() if "loss" in name}


def _weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model" / "model.safetensors"))


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_fresh_runs_are_identical_and_resume_is_exact(synth_dir, tmp_path):
    a, b, cut = tmp_path / "a", tmp_path / "b", tmp_path / "cut"
    # two fresh runs, and one stopped by its time limit after a few steps (resumed below without one)
    (out, err), _, _ = _train(
        _config(synth_dir, a), _config(synth_dir, b), _config(synth_dir, cut, "train.max_time_s=0.05")
    )
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert len(_losses(a)["loss"]) == STEPS and _losses(a) == _losses(b)
    assert _same_weights(_weights(a), _weights(b))

    # quiet by default: the progress bar, our one-line messages and the summary, no library INFO or warnings
    for noise in ("INFO", "Removed shared tensor", "UserWarning", "accelerate"):
        assert noise not in err + out
    assert out.startswith("completed: 6 steps")

    # the resumed run is the same run as `a`
    stopped_at = ckpt.read_trainer_state(ckpt.latest_checkpoint(cut))["step"]
    assert 0 < stopped_at < STEPS
    _train(_config(synth_dir, cut), extra=("--resume", "latest"))
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(cut))["step"] == STEPS
    assert _losses(cut) == _losses(a), f"resumed after step {stopped_at}"
    assert _same_weights(_weights(cut), _weights(a))


def test_a_run_that_fails_to_start_leaves_no_files(synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(synth_dir, run_dir, "data.train=" + str(tmp_path / "missing"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlm.cli", "train", "--config", str(config)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"mlm train: error: data source not found: {tmp_path}/missing"
    assert not run_dir.exists()
