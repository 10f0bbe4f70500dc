"""Hard-negative captions made by swapping one attribute word, as NegCLIP does (Yuksekgonul et al., 2023).

"a small red circle at the top left" becomes "a small red square at the top left" or "… at the bottom left": the
caption changes in exactly one word, drawn from a group of interchangeable words (shapes, colours, positions…).
An image must score its own caption above these, which a bag of colours and counts cannot do: it needs the shape
and the place. The groups come from the config (``data.swap_groups``); a word that is in no group is never changed.
"""

from __future__ import annotations

import random
import re

_WORD = re.compile(r"[A-Za-z]+")


def check_groups(groups: list[list[str]]) -> dict[str, list[str]]:
    """{word: its group} for lower-cased words; ValueError when a group is too small or a word is in two groups."""
    index: dict[str, list[str]] = {}
    for i, group in enumerate(groups):
        words = [w.strip().lower() for w in group]
        if len(set(words)) < 2 or not all(_WORD.fullmatch(w) for w in words):
            raise ValueError(f"data.swap_groups[{i}]={group!r}: a group needs two or more distinct plain words")
        for word in words:
            if word in index:
                raise ValueError(f"data.swap_groups: {word!r} is in more than one group")
            index[word] = words
    return index


def swap_negatives(caption: str, index: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """Up to n distinct captions that each differ from caption in one swapped word (fewer when it has fewer)."""
    if n <= 0:
        return []
    options = []
    for match in _WORD.finditer(caption):
        word = match.group(0).lower()
        for other in index.get(word, ()):
            if other != word:
                options.append((match.start(), match.end(), other))
    picked = rng.sample(options, min(n, len(options)))
    return [_with_article(caption[:start], other) + other + caption[end:] for start, end, other in picked]


def _with_article(before: str, word: str) -> str:
    """The text before a swapped word with a trailing "a"/"an" made to fit it, so the article gives nothing away."""
    match = re.search(r"\b([Aa]n?) $", before)
    if not match:
        return before
    article = "an" if word[0] in "aeiou" else "a"
    article = article.capitalize() if match.group(1)[0] == "A" else article
    return before[: match.start(1)] + article + " "
