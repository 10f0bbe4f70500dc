"""Tests for the SwiGLU feed-forward block."""

import torch
import torch.nn.functional as F

from mlm.layers.mlp import SwiGLU


def test_swiglu_computes_silu_gate_times_value():
    mlp = SwiGLU(8, 12).eval()
    x = torch.randn(2, 5, 8)
    gate, value = x @ mlp.fc1_g.weight.T, x @ mlp.fc1_x.weight.T  # (B, T, hidden)
    expected = (F.silu(gate) * value) @ mlp.fc2.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 8 * 12  # no biases


def test_swiglu_dropout_is_active_only_in_training():
    mlp = SwiGLU(8, 12, dropout=0.5)
    x = torch.randn(4, 8)
    assert not torch.equal(mlp.train()(x), mlp(x))
    assert torch.equal(mlp.eval()(x), mlp(x))
