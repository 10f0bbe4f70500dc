"""Length groups: rows of very different lengths run cut to their group's longest row, with the same results."""

import pytest
import torch

from mlm import model as model_module
from mlm.fusion.length_groups import length_groups, merge_rows, row_lengths
from tests.test_model import summed_losses, tiny_model


def prefix_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def test_groups_split_long_rows_from_short_ones():
    groups = length_groups(prefix_mask([3, 10, 2, 9, 3, 3], 10))
    assert [(rows.tolist(), length) for rows, length in groups] == [([1, 3], 10), ([0, 4, 5, 2], 3)]


def test_no_groups_when_the_saving_is_small_or_there_is_one_row():
    assert length_groups(prefix_mask([10, 9, 9, 8], 10)) is None
    assert length_groups(prefix_mask([4], 10)) is None


def test_row_length_runs_to_the_last_kept_token():
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    assert row_lengths(mask).tolist() == [3, 1]


def test_merge_rows_puts_groups_back_in_batch_order():
    x = torch.randn(5, 6, 2)
    groups = [(torch.tensor([4, 1]), 6), (torch.tensor([0, 3, 2]), 2)]
    merged = merge_rows([x[[4, 1]], x[[0, 3, 2], :2]], groups, 6)
    torch.testing.assert_close(merged[[1, 4]], x[[1, 4]])
    torch.testing.assert_close(merged[[0, 2, 3], :2], x[[0, 2, 3], :2])
    assert merged[[0, 2, 3], 2:].abs().sum() == 0


@pytest.mark.parametrize("extra", [[], ["model.cross_null=true", "model.cross_pos_keys=true"]])
def test_grouped_forward_equals_one_padded_pass(monkeypatch, extra):
    """Outputs at kept positions and every gradient equal those of the batch padded to its longest row."""
    torch.manual_seed(0)
    model = tiny_model(*extra).train()
    lengths = [9, 3, 2, 9, 3, 4]
    images, ids = torch.randn(6, 3, 16, 16), torch.randint(4, 48, (6, 9))
    mask = prefix_mask(lengths, 9)
    ids[~mask] = 0
    assert length_groups(mask) is not None

    def run():
        model.zero_grad()
        out = model(images, ids, mask)
        summed_losses(out, ids, mask).backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    grouped, grouped_grads = run()
    monkeypatch.setattr(model_module, "length_groups", lambda mask: None)
    single, single_grads = run()
    torch.testing.assert_close(grouped.text_embeds, single.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.image_embeds, single.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.logits[mask], single.logits[mask], atol=1e-5, rtol=1e-5)
    assert grouped_grads.keys() == single_grads.keys()
    for name, grad in grouped_grads.items():
        torch.testing.assert_close(grad, single_grads[name], atol=1e-5, rtol=1e-4, msg=name)
