"""Decoding strategies on a hand-built Markov chain: greedy, beam search and nucleus sampling."""

import math

import pytest
import torch

from mlm.generation import beam_search, next_tokens, sample_search, top_p_filter

EOS, BOS, A, B, C, D = range(6)


def chain(rows: dict[int, dict[int, float]]) -> torch.Tensor:
    """Return logits (6, 6) whose row i holds log P(next | last = i); unlisted tokens get ~0 probability."""
    probs = torch.zeros(6, 6)
    for last, nexts in rows.items():
        for token, p in nexts.items():
            probs[last, token] = p
    probs[EOS, EOS] = 1.0
    return (probs + 1e-12).log()


# Greedy takes A then C, but B then EOS is likelier per token.
GREEDY_TRAP = {
    BOS: {A: 0.5, B: 0.4, D: 0.05, EOS: 0.05},
    A: {C: 0.35, D: 0.3, EOS: 0.25, B: 0.1},
    B: {EOS: 0.95, C: 0.05},
    C: {EOS: 1.0},
    D: {EOS: 1.0},
}
# B EOS has the higher total log-prob (ln .45 > ln .55 + 2 ln .9) but A C EOS the higher mean per token.
LONGER_WINS = {BOS: {A: 0.55, B: 0.45}, A: {C: 0.9, EOS: 0.1}, B: {EOS: 1.0}, C: {EOS: 0.9, D: 0.1}, D: {EOS: 1.0}}


class MarkovSession:
    """Decoding session whose next-token distribution depends only on the newest token."""

    def __init__(self, batch: int, rows: dict = GREEDY_TRAP):
        self.table = chain(rows)
        self.batch = batch
        self.reorders = []

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.shape[0] == self.batch, (ids.shape, self.batch)
        return self.table[ids[:, -1]]

    def reorder(self, index: torch.Tensor) -> None:
        self.reorders.append(index.tolist())
        self.batch = index.numel()

    def expand(self, n: int) -> None:
        self.batch *= n


def first_logits(session: MarkovSession, batch: int) -> torch.Tensor:
    return session.step(torch.full((batch, 1), BOS))


def test_greedy_follows_the_argmax_chain_and_drops_finished_rows():
    session = MarkovSession(2)
    out = sample_search(session, first_logits(session, 2), max_new_tokens=5, eos_id=EOS, top_p=0.0, generator=None)
    assert out == [[A, C], [A, C]]
    short = sample_search(
        MarkovSession(1), chain(GREEDY_TRAP)[[BOS]], max_new_tokens=1, eos_id=EOS, top_p=0.0, generator=None
    )
    assert short == [[A]]


def test_beam_search_finds_the_better_length_normalised_sequence():
    session = MarkovSession(1)
    out = beam_search(session, first_logits(session, 1), num_beams=2, max_new_tokens=5, eos_id=EOS)
    # B EOS: (ln .4 + ln .95) / 2 = -0.48 beats A C EOS: (ln .5 + ln .35 + ln 1) / 3 = -0.58
    assert (math.log(0.4) + math.log(0.95)) / 2 > (math.log(0.5) + math.log(0.35)) / 3
    assert out == [[B]]
    assert session.reorders[0] == [0, 0]  # both beams grow from the single live first beam


def test_beam_search_ranks_finished_hypotheses_by_mean_log_prob_and_waits_for_longer_ones():
    assert math.log(0.45) > math.log(0.55) + 2 * math.log(0.9)
    assert (math.log(0.55) + 2 * math.log(0.9)) / 3 > math.log(0.45) / 2
    session = MarkovSession(1, LONGER_WINS)
    out = beam_search(session, first_logits(session, 1), num_beams=2, max_new_tokens=5, eos_id=EOS)
    assert out == [[A, C]]


def test_one_beam_equals_greedy():
    greedy_session, beam_session = MarkovSession(3), MarkovSession(3)
    greedy = sample_search(
        greedy_session, first_logits(greedy_session, 3), max_new_tokens=4, eos_id=EOS, top_p=0.0, generator=None
    )
    beam = beam_search(beam_session, first_logits(beam_session, 3), num_beams=1, max_new_tokens=4, eos_id=EOS)
    assert beam == greedy


def test_beam_search_stops_at_max_new_tokens_with_running_beams():
    session = MarkovSession(1)
    out = beam_search(session, first_logits(session, 1), num_beams=2, max_new_tokens=1, eos_id=EOS)
    assert out == [[A]]  # no hypothesis finished within one token: best running beam by mean log-prob


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False]
    assert kept(0.75) == [False, True, True]
    assert kept(0.85) == [True, True, True]


def test_nucleus_samples_only_inside_the_nucleus_with_renormalised_frequencies():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log().expand(4000, 3)
    draws = next_tokens(logits, 0.75, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert counts[0] == 0
    assert counts[1] == pytest.approx(0.5 / 0.8, abs=0.03)
    again = next_tokens(logits, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_beam_search_rejects_beams_wider_than_the_vocabulary():
    session = MarkovSession(1)
    with pytest.raises(ValueError, match="num_beams=4"):
        beam_search(session, first_logits(session, 1), num_beams=4, max_new_tokens=2, eos_id=EOS)
