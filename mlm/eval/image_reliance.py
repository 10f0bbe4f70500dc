"""How much of a VQA score the image explains: every question answered again about another question's image.

A model that answers a question type from the question's words alone (a language prior, Goyal et al., 2017) scores
the same with the wrong image; the drop per answer and question type is what the image contributes. The other image
is a fixed, seedless pairing: the questions ordered by their image, each paired with the one half the list away, so
two runs pair the same questions and no question keeps its own image unless one image holds over half of them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


def shuffled_partners(image_keys: Sequence[Hashable]) -> list[int]:
    """For each question, the index of the question whose image it is asked about instead of its own."""
    n = len(image_keys)
    if len({*image_keys}) < 2:
        raise ValueError("shuffled images need questions about at least two different images")
    order = sorted(range(n), key=lambda i: (repr(image_keys[i]), i))
    partners = [0] * n
    for rank, i in enumerate(order):
        partners[i] = order[(rank + n // 2) % n]
    return partners


def reliance(metrics: dict[str, Any], shuffled: dict[str, Any]) -> dict[str, Any]:
    """The shuffled-image accuracies and, per answer and question type, the points the own image adds."""

    def gains(kind: str) -> dict[str, float]:
        return {name: metrics[kind][name] - value for name, value in shuffled[kind].items() if name in metrics[kind]}

    return {
        "overall": shuffled["overall"],
        "per_answer_type": shuffled["per_answer_type"],
        "per_question_type": shuffled["per_question_type"],
        "image_gain": metrics["overall"] - shuffled["overall"],
        "image_gain_per_answer_type": gains("per_answer_type"),
        "image_gain_per_question_type": gains("per_question_type"),
    }
