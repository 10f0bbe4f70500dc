"""Mixed-precision choice per device, and the tracker/config plumbing of the Accelerator."""

import logging

import pytest
import torch

from mlm.train import setup


def test_auto_precision_per_device(monkeypatch):
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: False)
    assert setup.resolve_mixed_precision("auto", "cpu") == "no"  # AVX2-only CPUs emulate bf16 matmuls: fp32
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: True)
    assert setup.resolve_mixed_precision("auto", "cpu") == "no"  # native bf16 too: autocast's casts cost more
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert setup.resolve_mixed_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert setup.resolve_mixed_precision("auto", "cuda") == "bf16"
    assert setup.resolve_mixed_precision("no", "cuda") == "no"


def test_fp16_needs_cuda_and_bf16_on_a_slow_cpu_warns(monkeypatch, caplog):
    with pytest.raises(ValueError, match="train.mixed_precision=fp16 needs CUDA"):
        setup.resolve_mixed_precision("fp16", "cpu")
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert setup.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert "much slower than fp32" in caplog.text


def test_native_bf16_detection(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not setup.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert setup.cpu_has_native_bf16()


def test_flat_config_is_tracker_friendly():
    from mlm.config import Config

    flat = setup._flat_config(Config())
    assert flat["train.lr"] == Config().train.lr
    assert flat["model.levels"] == str(Config().model.levels)
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
