"""Word grounding at the decoder's input: the search over word maps, its presence score and its decoding state."""

import math

import pytest
import torch

from mlm.fusion.grounding import WordGrounding


def grounding(heads: int = 1, dim: int = 8, vocab: int = 5, patches: int = 2) -> WordGrounding:
    torch.manual_seed(0)
    return WordGrounding(dim, vocab, heads, torch.randn(1, patches, dim))


def two_images() -> torch.Tensor:
    """Word log-probs (2, 2 patches, 5 words): in image 0 patch 0 shows words 1 and 2; in image 1 word 1 is on
    patch 0 and word 2 on patch 1, so no patch shows both."""
    lp = torch.full((2, 2, 5), -5.0)
    lp[0, 0, 1] = lp[0, 0, 2] = -1.0
    lp[1, 0, 1] = lp[1, 1, 2] = -1.0
    return lp


def test_the_presence_score_and_the_search_match_a_hand_computation():
    g = grounding()
    with torch.no_grad():
        g.decay_logit.fill_(0.0)  # gamma = 0.5
    state = g.start(torch.randn(2, 2, 8), two_images())
    attn, score = g.search(torch.tensor([[1, 2], [1, 2]]), state)
    # image 0: S = (-1.5, -7.5), normaliser 0.5 * -1 + -1 = -1.5 -> score 0, peak -1.5
    # image 1: S = (0.5 * -1 + -5, 0.5 * -5 + -1) = (-5.5, -3.5) -> score -3.5 + 1.5 = -2, peak -3.5
    torch.testing.assert_close(score[:, 0, 1], torch.tensor([[0.0, -1.5], [-2.0, -3.5]]))
    torch.testing.assert_close(attn[1, 0, 1, 1], torch.tensor(1 / (1 + math.exp(-2.0))))
    torch.testing.assert_close(attn[0, 0, 1, 0], torch.tensor(1 / (1 + math.exp(-6.0))))
    torch.testing.assert_close(score[:, 0, 0, 0], torch.zeros(2))  # one word is always seen somewhere ...
    torch.testing.assert_close(score[:, 0, 0, 1], torch.tensor([-1.0, -1.0]))  # ... and the peak says how well


def test_the_peak_tells_a_present_word_from_an_absent_one_and_unlearned_words_start_silent():
    g = grounding()
    lp = torch.full((2, 2, 5), -6.0)
    lp[0, 0, 1] = -0.5  # word 1 ("red") shown by image 0 only
    lp[:, :, 3] = -2.0  # word 3 ("is"): a flat map, the same everywhere
    state = g.start(torch.randn(2, 2, 8), lp)
    ids = torch.tensor([[3, 1], [3, 1]])
    _, score = g.search(ids, state)
    assert score[0, 0, 1, 1] > score[1, 0, 1, 1] + 5  # the peak: present in image 0, absent in image 1
    torch.testing.assert_close(score[:, 0, 1, 0], torch.zeros(2))  # the normalised score cannot see it
    g.start_words(torch.tensor([False, True, False, False, False]))  # the objective learned word 1 alone
    _, score = g.search(ids, state)
    torch.testing.assert_close(score[:, 0, 1, 1], torch.tensor([-0.5, -6.0]))  # "is" no longer counts
    with pytest.raises(ValueError, match="3 word flags for a vocabulary of 5"):
        g.start_words(torch.ones(3, dtype=torch.bool))


def test_it_starts_as_the_identity_is_causal_and_decodes_with_its_state():
    g = grounding(heads=3)
    image, x, ids = torch.randn(2, 2, 8), torch.randn(2, 6, 8), torch.randint(0, 5, (2, 6))
    torch.testing.assert_close(g(x, ids, g.start(image, two_images())), x)  # zero projection: no change
    torch.nn.init.normal_(g.out.weight)
    full = g(x, ids, g.start(image, two_images()))
    torch.testing.assert_close(g(x[:, :4], ids[:, :4], g.start(image, two_images())), full[:, :4])
    state = g.start(image, two_images())
    steps = [g(x[:, :2], ids[:, :2], state, cached=True)]
    steps += [g(x[:, t : t + 1], ids[:, t : t + 1], state, cached=True) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    state.reorder(torch.tensor([1])).expand(2)
    assert state.sums.shape == (2, 3, 2) and torch.equal(state.word_logprobs[0], two_images()[1])


def test_a_grid_that_does_not_match_the_image_tokens_is_named():
    with pytest.raises(ValueError, match="2 image tokens, the patch grid has 4"):
        grounding(patches=4).start(torch.randn(1, 2, 8), two_images()[:1])


def test_weights_saved_with_one_presence_score_are_refused_in_one_line():
    model = grounding(heads=2)
    old = dict(model.state_dict(), **{"out.weight": torch.zeros(8, 2 * (8 + 1))})  # before the peak score
    with pytest.raises(ValueError, match="out.weight: saved by word grounding with one presence score per head"):
        model.load_state_dict(old)
    model.load_state_dict(grounding(heads=2).state_dict())  # the current layout loads
