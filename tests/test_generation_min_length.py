"""min_new_tokens: EOS is forbidden for the first tokens, in greedy and beam search, through MLMModel.generate_ids."""

import pytest
import torch

from mlm.config import load_config
from mlm.generation import MinLengthSession, beam_search, sample_search
from mlm.model import MLMModel

EOS, BOS, A, B = 0, 1, 2, 3


class EosFirstSession:
    """Next-token logits that always prefer EOS, then A, then B."""

    def __init__(self, batch: int):
        self.batch = batch

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.0, -9.0, -1.0, -2.0]]).expand(self.batch, 4).clone()

    def reorder(self, index: torch.Tensor) -> None:
        self.batch = index.numel()

    def expand(self, n: int) -> None:
        self.batch *= n


def decode(min_new_tokens: int, num_beams: int) -> list[list[int]]:
    session = EosFirstSession(2)
    if min_new_tokens:
        session = MinLengthSession(session, EOS, min_new_tokens)
    first = session.step(torch.full((2, 1), BOS))
    if num_beams > 1:
        return beam_search(session, first, num_beams=num_beams, max_new_tokens=5, eos_id=EOS)
    return sample_search(session, first, max_new_tokens=5, eos_id=EOS, top_p=0.0, generator=None)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_min_new_tokens_delays_eos_by_exactly_that_many_tokens(num_beams):
    assert decode(0, num_beams) == [[], []]
    assert decode(1, num_beams) == [[A], [A]]
    assert decode(3, num_beams) == [[A, A, A], [A, A, A]]


def test_generate_ids_passes_min_new_tokens_and_checks_it():
    sets = ["model.dim=16", "model.n_layers=1", "model.levels=[global]", "model.image_size=8", "model.patch_size=4",
            "model.vocab_size=12", "model.embed_dim=8", "model.pool_hidden_dim=8", "model.decoder_layers=1",
            "model.mla.n_heads=1", "model.mla.kv_lora_rank=8", "model.mla.qk_nope_head_dim=4",
            "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=4"]  # fmt: skip
    model = MLMModel(load_config(None, sets).model).eval()
    images = torch.randn(2, 3, 8, 8)
    eos_first = model.generate_ids(images, [[1], [1]], eos_id=3, max_new_tokens=4, min_new_tokens=0)
    forced = model.generate_ids(images, [[1], [1]], eos_id=3, max_new_tokens=4, min_new_tokens=4)
    assert all(len(ids) == 4 and 3 not in ids for ids in forced)
    assert all(len(ids) <= 4 for ids in eos_first)
    with pytest.raises(ValueError, match="min_new_tokens=5"):
        model.generate_ids(images, [[1], [1]], eos_id=3, max_new_tokens=4, min_new_tokens=5)
