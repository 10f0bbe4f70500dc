"""Tests for level masks (local, regional, global, causal) and top-k selection."""

import pytest
import torch

from mlm.layers.masks import level_mask, top_k_mask

SIZES = dict(window=1, window_2d=3, region=3, region_2d=2)


def test_local_1d_hand_worked():
    mask = level_mask("local", 5, causal=False, grid=None, **SIZES)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_local_2d_is_a_square_patch_neighbourhood():
    mask = level_mask("local", 16, causal=False, grid=(4, 4), **SIZES)  # 3x3 neighbourhood on a 4x4 grid
    seen = mask[1 * 4 + 1].view(4, 4)  # patch (row 1, col 1)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:3, 0:3] = True
    assert torch.equal(seen, expected)
    assert mask[0].sum() == 4  # corner patch sees a 2x2 block


def test_regional_1d_hand_worked():
    mask = level_mask("regional", 6, causal=False, grid=None, **SIZES)  # regions {0,1,2} {3,4,5}
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 1],
            [1, 0, 0, 1, 1, 1],
            [1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_regional_2d_sees_own_block_and_top_left_of_others():
    mask = level_mask("regional", 16, causal=False, grid=(4, 4), **SIZES)  # four 2x2 blocks
    assert set(mask[0].nonzero().flatten().tolist()) == {0, 1, 4, 5, 2, 8, 10}
    assert set(mask[15].nonzero().flatten().tolist()) == {10, 11, 14, 15, 0, 2, 8}


@pytest.mark.parametrize("level", ["local", "regional", "global"])
def test_causal_keeps_only_earlier_keys(level):
    full = level_mask(level, 12, causal=False, grid=None, **SIZES)
    causal = level_mask(level, 12, causal=True, grid=None, **SIZES)
    assert torch.equal(causal, full & torch.ones(12, 12, dtype=torch.bool).tril())
    assert causal.diagonal().all()


def test_masks_are_cached_per_shape():
    a = level_mask("local", 10, causal=True, grid=None, **SIZES)
    b = level_mask("local", 10, causal=True, grid=None, **SIZES)
    c = level_mask("local", 11, causal=True, grid=None, **SIZES)
    assert a is b and a is not c


def test_level_mask_errors_name_the_value():
    with pytest.raises(ValueError, match="'sparse'"):
        level_mask("sparse", 4, causal=False, grid=None, **SIZES)
    with pytest.raises(ValueError, match="3x3 has 9 patches but n_tokens=10"):
        level_mask("local", 10, causal=False, grid=(3, 3), **SIZES)


def test_top_k_keeps_exactly_k_best_allowed_keys():
    scores = torch.randn(2, 3, 7, 9)
    mask = torch.ones(7, 9, dtype=torch.bool).tril(1)  # row i allows i + 2 keys
    keep = top_k_mask(scores, mask, k=3)
    allowed = mask.sum(-1)  # (7,)
    assert torch.equal(keep.sum(-1), allowed.clamp(max=3).expand(2, 3, 7))
    assert not (keep & ~mask).any()
    # every kept key outscores every allowed key that was dropped
    kept_min = scores.masked_fill(~keep, float("inf")).amin(-1)
    dropped_max = scores.masked_fill(keep | ~mask, float("-inf")).amax(-1)
    assert (kept_min > dropped_max).all()


def test_length_adaptive_top_k_keeps_the_schedules_share_of_each_rows_keys():
    from mlm.layers.sparsity import SEEDS, KeepSchedule

    scores = torch.randn(2, 3, 6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()  # row i may see i + 1 keys; short rows keep 80%
    keep = top_k_mask(scores, causal, SEEDS)
    assert keep.sum(-1)[0, 0].tolist() == [1, 2, 3, 4, 4, 5]  # ceil(0.8 n)
    assert not (keep & ~causal).any()
    kept_min = scores.masked_fill(~keep, float("inf")).amin(-1)
    dropped_max = scores.masked_fill(keep | ~causal, float("-inf")).amax(-1)
    assert (kept_min > dropped_max).all()
    long = top_k_mask(torch.randn(1, 2048), None, SEEDS)  # from 1,024 keys: 20%
    assert int(long.sum()) == 410
    mid = KeepSchedule.from_config([10, 1.0, 1000, 0.1])  # log-linear between: halfway at 100 keys
    assert int(top_k_mask(torch.randn(1, 100), None, mid).sum()) == 55
    with pytest.raises(ValueError, match="short_len < long_len"):
        KeepSchedule.from_config([100, 0.8, 50, 0.2])


def test_a_bad_sparsity_schedule_names_the_setting():
    from mlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.sparsity_schedule=\[256.0, 0.8\]: four numbers"):
        load_config(None, ["model.sparsity_schedule=[256,0.8]"])
    with pytest.raises(ConfigError, match="keep fractions in"):
        load_config(None, ["model.sparsity_schedule=[256,1.5,1024,0.2]"])


def test_top_k_without_mask_and_bad_k():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert top_k_mask(scores, None, 2).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="k=0"):
        top_k_mask(scores, None, 0)


def test_masks_built_while_exporting_are_not_cached_for_later_eager_calls():
    class Masked(torch.nn.Module):
        def forward(self, x):
            mask = level_mask("local", 7, causal=True, grid=None, window=2, window_2d=3, region=2, region_2d=2)
            return x.masked_fill(~mask, 0.0)

    torch.export.export(Masked(), (torch.ones(7, 7),))  # traced with fake tensors
    mask = level_mask("local", 7, causal=True, grid=None, window=2, window_2d=3, region=2, region_2d=2)
    assert type(mask) is torch.Tensor and int(mask.sum()) == 7 + 6 + 5


@pytest.mark.parametrize("level", ["local", "regional", "global"])
@pytest.mark.parametrize("causal", [False, True])
def test_text_pairs_are_the_rows_and_columns_of_the_dense_mask(level, causal):
    from mlm.layers.masks import text_pairs

    dense = level_mask(level, 11, causal=causal, grid=None, **SIZES)
    size = {"local": SIZES["window"], "regional": SIZES["region"]}.get(level, 0)
    idx = torch.arange(11)
    assert torch.equal(text_pairs(level, idx, idx, size, causal), dense)
    rows, keys = torch.tensor([7]), torch.arange(9)  # one decoding step's row over the first 9 keys
    assert torch.equal(text_pairs(level, rows, keys, size, causal), dense[7:8, :9])
