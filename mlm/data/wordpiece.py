"""Deterministic WordPiece vocabulary learning: BPE merges over words, continuation pieces marked ``##``.

This is what HF ``tokenizers``' WordPieceTrainer does (a BpeTrainer with continuing_subword_prefix ``##``), except
for ties: that trainer breaks them by internal ids that follow Rust HashMap order, so two processes learn different
vocabularies from the same texts. Here the most frequent pair wins and a tie goes to the pair whose strings sort
first, so the same texts and settings always give the same vocabulary. WordPiece is BERT's (Devlin et al., 2019);
learning it by merges is BPE (Sennrich et al., 2016).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise

from tokenizers import normalizers, pre_tokenizers

PREFIX = "##"

Pair = tuple[int, int]


def count_words(
    texts: Iterable[str], normalizer: normalizers.Normalizer, pre_tokenizer: pre_tokenizers.PreTokenizer
) -> dict[str, int]:
    """Frequency of each word of the texts, as the tokenizer's normalizer and pre-tokenizer cut them.

    The pre-tokenizer must split on whitespace first (BertPreTokenizer and Whitespace do): each distinct
    whitespace-separated chunk is pre-tokenized once, which is what makes counting 600k captions take seconds.
    """
    chunks: Counter[str] = Counter()
    for text in texts:
        chunks.update(normalizer.normalize_str(text).split())
    words: Counter[str] = Counter()
    for chunk, count in chunks.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
            words[word] += count
    return dict(words)


def learn_vocab(
    word_counts: dict[str, int], vocab_size: int, min_frequency: int = 1, special_tokens: Sequence[str] = ()
) -> list[str]:
    """Tokens in id order: the special tokens, the alphabet, then one token per merge.

    The alphabet is every character seen, sorted, followed by ``##c`` for every character seen inside a word, sorted;
    it is always kept whole, so vocab_size only limits the merges. Merging stops at vocab_size tokens or when the most
    frequent pair occurs fewer than min_frequency times (counted over words times their frequency).
    """
    tokens: list[str] = []
    token_ids: dict[str, int] = {}

    def add(token: str) -> int:
        if token not in token_ids:
            token_ids[token] = len(tokens)
            tokens.append(token)
        return token_ids[token]

    for token in special_tokens:
        add(token)
    chars = sorted({c for word in word_counts for c in word})
    inner = sorted({c for word in word_counts for c in word[1:]})
    for token in chars + [PREFIX + c for c in inner]:
        add(token)
    words = [[token_ids[w[0]]] + [token_ids[PREFIX + c] for c in w[1:]] for w in word_counts if w]
    merges = _PairMerger(words, [count for w, count in word_counts.items() if w], tokens)
    while len(tokens) < vocab_size:
        best = merges.best()
        if best is None or best[0] < min_frequency:
            break
        left, right = (tokens[i] for i in best[1])
        # a continuation piece loses its prefix inside the merged token: "a" + "##b" -> "ab", "##a" + "##b" -> "##ab"
        merged = left + right.removeprefix(PREFIX)
        # should two pairs ever spell the same token, they share its one id (as in HF's trainer)
        merges.merge(best[1], add(merged))
    return tokens


class _PairMerger:
    """Adjacent-pair counts over weighted words, kept up to date as pairs are merged.

    Each merge touches only the words that hold the pair (found through ``where``); a heap of (-count, left string,
    right string) finds the best pair, and entries whose count has since changed are skipped when popped.
    """

    def __init__(self, words: list[list[int]], counts: list[int], tokens: list[str]):
        self.words = words
        self.counts = counts
        self.tokens = tokens  # shared with the caller, which appends merged tokens
        self.pair_counts: dict[Pair, int] = {}
        self.where: dict[Pair, set[int]] = {}
        for index, word in enumerate(words):
            for pair, n in _pairs(word).items():
                self.pair_counts[pair] = self.pair_counts.get(pair, 0) + n * counts[index]
                self.where.setdefault(pair, set()).add(index)
        self.heap = [self._entry(pair, count) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def _entry(self, pair: Pair, count: int) -> tuple[int, str, str, Pair]:
        return -count, self.tokens[pair[0]], self.tokens[pair[1]], pair

    def best(self) -> tuple[int, Pair] | None:
        """The most frequent pair and its count (ties: the smaller (left, right) strings), or None if none is left."""
        while self.heap:
            neg_count, _, _, pair = self.heap[0]
            if self.pair_counts.get(pair) == -neg_count:
                return -neg_count, pair
            heapq.heappop(self.heap)  # stale: the pair's count changed, and a newer entry holds the current one
        return None

    def merge(self, pair: Pair, merged: int) -> None:
        """Replace every occurrence of the pair by the merged token, updating the counts of the pairs around it."""
        changed: set[Pair] = set()
        # sorted so the work is done in the same order every time (the counts would come out the same regardless)
        for index in sorted(self.where[pair]):
            old, new = self.words[index], _merge_word(self.words[index], pair, merged)
            self.words[index] = new
            before, after = _pairs(old), _pairs(new)
            for p in before.keys() | after.keys():
                delta = after.get(p, 0) - before.get(p, 0)
                if delta:
                    self.pair_counts[p] = self.pair_counts.get(p, 0) + delta * self.counts[index]
                    changed.add(p)
                if p not in after:
                    self.where[p].discard(index)
                elif p not in before:
                    self.where.setdefault(p, set()).add(index)
        for p in changed:
            count = self.pair_counts[p]
            if count > 0:
                heapq.heappush(self.heap, self._entry(p, count))
            else:
                del self.pair_counts[p]
                self.where.pop(p, None)
        assert pair not in self.pair_counts, "a merged pair is left in some word"


def _pairs(word: list[int]) -> Counter[Pair]:
    """How often each adjacent pair occurs in the word (overlaps counted, as in "aaa")."""
    return Counter(pairwise(word))


def _merge_word(word: list[int], pair: Pair, merged: int) -> list[int]:
    """The word with each occurrence of the pair, scanned left to right without overlap, replaced by merged."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
