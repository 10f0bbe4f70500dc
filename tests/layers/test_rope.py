"""Tests for 1-D and 2-D rotary position embeddings."""

import math

import pytest
import torch

from mlm.layers.rope import apply_rope, rope_1d, rope_2d


def test_rope_1d_hand_worked_angles():
    cos, sin = rope_1d(torch.tensor([0, 1, 3]), dim=4, theta=100.0)
    # dim 4 -> frequencies 100 ** (-0/4) = 1 and 100 ** (-2/4) = 0.1; pair i shares its angle with i + 2.
    angles = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.1, 1.0, 0.1], [3.0, 0.3, 3.0, 0.3]])
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())


def test_apply_rope_rotates_pairs_i_and_i_plus_half():
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0]])  # pairs (x0, x2) = (1, 0) and (x1, x3) = (0, 2)
    cos, sin = rope_1d(torch.tensor([1]), dim=4, theta=100.0)
    out = apply_rope(x, cos, sin)
    expected = torch.tensor([[math.cos(1.0), -2 * math.sin(0.1), math.sin(1.0), 2 * math.cos(0.1)]])
    torch.testing.assert_close(out, expected)


def test_rope_1d_scores_depend_only_on_offset():
    q, k = torch.randn(2, 8), torch.randn(2, 8)
    cos, sin = rope_1d(torch.arange(20), dim=8)
    rq, rk = apply_rope(q[:, None], cos, sin), apply_rope(k[:, None], cos, sin)  # (2, 20, 8)
    score_5_2 = (rq[:, 5] * rk[:, 2]).sum(-1)
    score_17_14 = (rq[:, 17] * rk[:, 14]).sum(-1)
    torch.testing.assert_close(score_5_2, score_17_14)
    assert not torch.allclose(score_5_2, (rq[:, 5] * rk[:, 3]).sum(-1))
    torch.testing.assert_close(rq.norm(dim=-1), q[:, None].norm(dim=-1).expand(2, 20))


def test_rope_2d_axial_split_and_row_major_order():
    grid_h, grid_w, dim = 3, 4, 8
    cos, sin = rope_2d(grid_h, grid_w, dim)
    assert cos.shape == sin.shape == (grid_h * grid_w, dim)
    angles = torch.atan2(sin, cos)  # (N, dim), angles are small enough not to wrap for these positions
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, dim // 2, 2) / (dim // 2))  # per-axis ladder (dim/4,)
    expected = torch.cat((rows[:, None] * freqs, cols[:, None] * freqs), dim=-1)  # (N, dim/2)
    torch.testing.assert_close(angles[:, : dim // 2], expected)
    torch.testing.assert_close(angles[:, dim // 2 :], expected)


def test_rope_2d_scores_depend_only_on_row_and_column_offsets():
    grid_h, grid_w, dim = 5, 6, 8
    q, k = torch.randn(dim), torch.randn(dim)
    cos, sin = rope_2d(grid_h, grid_w, dim)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (N, dim)

    def score(qr, qc, kr, kc):
        return (rq[qr * grid_w + qc] * rk[kr * grid_w + kc]).sum()

    torch.testing.assert_close(score(1, 2, 0, 1), score(4, 5, 3, 4))
    assert not torch.allclose(score(1, 2, 0, 1), score(1, 2, 1, 0))  # swapping the axes changes the score


def test_rope_2d_rejects_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_2d(2, 2, 6)
