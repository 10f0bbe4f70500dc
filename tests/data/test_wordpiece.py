"""WordPiece learning: byte-identical tokenizers across processes, hand-worked merges and ties, limits, round trips."""

import os
import random
import subprocess
import sys
from collections import Counter
from itertools import pairwise

import pytest
from tokenizers import normalizers, pre_tokenizers

from mlm.data.tokenizer import SPECIAL_TOKENS, UNK, MLMTokenizer
from mlm.data.wordpiece import count_words, learn_vocab

# the ten pairs of the first two texts are the most frequent and equally so: their order rests on the tie-break
TIE_TEXTS = ["ab cd ef gh ij", "ba dc fe hg ji"] * 3 + ["A blue circle"]
CORPUS = [
    "A red circle at the top-left and a small blue square: in the centre",
    "Café Crème with a naïve ÜBER-circle",
    "question: what color is the circle? answer: red",
    "two green triangles and one yellow star",
]


def _bert_words(texts: list[str]) -> dict[str, int]:
    return count_words(
        texts,
        normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=True),
        pre_tokenizers.BertPreTokenizer(),
    )


def _reference_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int) -> list[str]:
    """The same learning done by recounting every pair after every merge: slow, but plainly right."""
    vocab = sorted({c for w in word_counts for c in w}) + sorted({"##" + c for w in word_counts for c in w[1:]})
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in word_counts}
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, symbols in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += word_counts[word]
        best = min(pairs, key=lambda p: (-pairs[p], p), default=None)
        if best is None or pairs[best] < min_frequency:
            break
        merged = best[0] + best[1][2:]
        vocab += [merged] * (merged not in vocab)
        for word, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                pair_here = i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best
                out.append(merged if pair_here else symbols[i])
                i += 2 if pair_here else 1
            words[word] = out
    return vocab


def test_same_texts_give_byte_identical_tokenizer_json_across_processes(tmp_path):
    first_pairs = Counter()
    for word, count in _bert_words(TIE_TEXTS).items():
        for pair in pairwise(word):
            first_pairs[pair] += count
    top = max(first_pairs.values())
    assert sum(n == top for n in first_pairs.values()) > 1  # the corpus does hold ties
    code = (
        "import sys\nfrom mlm.data.tokenizer import MLMTokenizer\n"
        f"MLMTokenizer.train_wordpiece({TIE_TEXTS!r}, vocab_size=90).save(sys.argv[1])\n"
    )
    saved = []
    for seed in ("1", "2"):
        path = tmp_path / f"seed{seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, capture_output=True)
        saved.append(path.read_bytes())
    assert saved[0] == saved[1]
    assert saved[0] == MLMTokenizer.train_wordpiece(TIE_TEXTS, vocab_size=90).save(tmp_path / "here.json").read_bytes()


def test_hand_worked_merges_and_tie_break():
    words = _bert_words(["Zy zy ZY zy xab xab xab cd cd cd"])
    assert words == {"zy": 4, "xab": 3, "cd": 3}
    alphabet = ["a", "b", "c", "d", "x", "y", "z", "##a", "##b", "##d", "##y"]  # "##c": c never follows a letter
    # zy (4 times) first; then three pairs tie at 3 and go in string order: ("##a", "##b") < ("c", "##d") <
    # ("x", "##a"), and merging the first turns the last into ("x", "##ab")
    merges = ["zy", "##ab", "cd", "xab"]
    assert learn_vocab(words, 100, special_tokens=["[PAD]"]) == ["[PAD]"] + alphabet + merges
    assert learn_vocab(words, 1 + len(alphabet) + 2, special_tokens=["[PAD]"]) == ["[PAD]"] + alphabet + merges[:2]


@pytest.mark.parametrize("seed", range(30))
def test_incremental_counts_match_a_full_recount(seed):
    rng = random.Random(seed)
    # a small alphabet and small counts make repeated letters ("aaa"), shared pieces and ties common
    words = {"".join(rng.choices("abcd", k=rng.randint(1, 8))): rng.randint(1, 4) for _ in range(rng.randint(1, 25))}
    vocab_size, min_frequency = rng.randint(5, 80), rng.randint(1, 3)
    assert learn_vocab(words, vocab_size, min_frequency) == _reference_vocab(words, vocab_size, min_frequency)


def test_round_trip_of_the_corpus_and_unknown_characters():
    tok = MLMTokenizer.train_wordpiece(CORPUS * 2, vocab_size=150)
    normalizer, pre_tokenizer = tok.tokenizer.normalizer, tok.tokenizer.pre_tokenizer
    for text in CORPUS:
        words = [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
        ids = tok.encode(text)
        assert tok.tokenizer.token_to_id(UNK) not in ids
        # the WordPiece decoder glues "?" to the word before it; every other piece comes back space-separated
        assert tok.decode(ids) == " ".join(words).replace(" ?", "?")
    # a word never seen, spelt with letters seen inside words, still needs no [UNK]
    assert tok.tokenizer.token_to_id(UNK) not in tok.tokenize("tangerine")
    assert tok.tokenizer.encode("red ☃ re☃d", add_special_tokens=False).tokens == ["red", UNK, UNK]


def test_vocab_size_and_min_frequency_are_respected():
    tok = MLMTokenizer.train_wordpiece(CORPUS, vocab_size=70)
    assert tok.vocab_size == 70
    everything = MLMTokenizer.train_wordpiece(CORPUS, vocab_size=100_000)
    full = everything.vocab_size
    assert 70 < full < 100_000  # the corpus runs out of pairs first
    assert MLMTokenizer.train_wordpiece(CORPUS, vocab_size=full).tokenizer.to_str() == everything.tokenizer.to_str()
    words = {"zy": 4, "xab": 3, "cd": 3}
    assert learn_vocab(words, 100, min_frequency=4)[-2:] == ["##y", "zy"]  # only zy occurs 4 times
    assert learn_vocab(words, 100, min_frequency=5)[-1] == "##y"  # no merge at all
    # the alphabet is kept whole even when it alone overflows vocab_size, so any seen character encodes
    assert learn_vocab(words, 3) == ["a", "b", "c", "d", "x", "y", "z", "##a", "##b", "##d", "##y"]
    assert MLMTokenizer.train_wordpiece(CORPUS, vocab_size=1, min_frequency=10**9).vocab_size > len(SPECIAL_TOKENS)


def test_special_tokens_come_first_with_ids_0_to_4():
    tok = MLMTokenizer.train_wordpiece(CORPUS, vocab_size=100)
    assert [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    added = tok.tokenizer.get_added_tokens_decoder()
    assert [(i, added[i].content, added[i].special) for i in sorted(added)] == [
        (i, t, True) for i, t in enumerate(SPECIAL_TOKENS)
    ]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 2, 3, 4)
    vocab = tok.tokenizer.get_vocab()
    assert len(vocab) == len(set(vocab.values())) == tok.vocab_size  # unique strings, ids 0..n-1
    assert sorted(vocab.values()) == list(range(tok.vocab_size))
