"""Hierarchical pooling: level order and weights, masked softmax pooling, shared projection, L2 normalisation."""

import pytest
import torch
import torch.nn.functional as F

from mlm.encoders.pooling import HierarchicalPooling, last_block_of_level, present_levels


def test_levels_are_ordered_low_to_high_with_weights_from_point_one_to_one():
    assert present_levels(["global", "local", "global", "regional"]) == ["local", "regional", "global"]
    assert last_block_of_level(["local", "global", "local", "regional"]) == {"local": 2, "regional": 3, "global": 1}
    pool = HierarchicalPooling(8, ["global", "local", "regional", "global"], hidden_dim=4, embed_dim=6)
    torch.testing.assert_close(pool.level_weights.data, torch.tensor([0.1, 0.55, 1.0]))
    two = HierarchicalPooling(8, ["local", "global"], hidden_dim=4, embed_dim=6)
    torch.testing.assert_close(two.level_weights.data, torch.tensor([0.1, 1.0]))
    one = HierarchicalPooling(8, ["global"], hidden_dim=4, embed_dim=6)
    torch.testing.assert_close(one.level_weights.data, torch.tensor([1.0]))


def test_constant_scores_give_the_masked_mean_mixed_by_level_weights():
    pool = HierarchicalPooling(4, ["local", "global"], hidden_dim=3, embed_dim=5)
    for scorer in pool.scorers.values():  # every position scores the same -> uniform softmax
        torch.nn.init.zeros_(scorer[2].weight)
    local = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    glob = -torch.ones(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = pool({"local": local, "global": glob}, mask)

    mean_local = torch.stack([local[0].mean(0), local[1, :2].mean(0)])
    expected_mix = 0.1 * mean_local + 1.0 * -torch.ones(2, 4)
    torch.testing.assert_close(out.pooled, expected_mix)
    torch.testing.assert_close(out.embeds, F.normalize(expected_mix @ pool.proj.weight.T, dim=-1))
    torch.testing.assert_close(out.weights["local"], torch.tensor([[1 / 3] * 3, [0.5, 0.5, 0.0]]))
    torch.testing.assert_close(out.embeds.norm(dim=-1), torch.ones(2))


def test_softmax_weights_follow_the_scores_and_ignore_padding():
    pool = HierarchicalPooling(2, ["global"], hidden_dim=2, embed_dim=2)
    states = torch.randn(3, 5, 2)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] + [False] * 4])
    out = pool({"global": states}, mask)
    weights = out.weights["global"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert bool((weights[~mask] == 0).all())
    assert weights[2, 0] == 1.0
    padded = states.clone()
    padded[~mask] = 100.0  # pad contents must not matter
    torch.testing.assert_close(pool({"global": padded}, mask).embeds, out.embeds)


def test_pooling_errors_name_the_problem():
    pool = HierarchicalPooling(2, ["local", "global"], hidden_dim=2, embed_dim=2)
    with pytest.raises(ValueError, match="levels \\['local'\\]"):
        pool({"global": torch.randn(1, 3, 2)})
    with pytest.raises(ValueError, match="at least one real"):
        pool({"local": torch.randn(1, 3, 2), "global": torch.randn(1, 3, 2)}, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="'mid'"):
        present_levels(["mid"])
