"""How well a perfect model could rank the synthetic benchmark: partial captions that fit several scenes.

A caption such as "a large red circle." fits every scene with exactly one large red circle, so even a model that
reads every scene perfectly has to guess among them; the expected text→image R@1 of such a model is the ceiling.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlm.data.synthetic import SceneObject, _full_caption, _relations, _templates, sample_scene


def possible_captions(objects: list[SceneObject]) -> set[str]:
    """Every caption :func:`make_captions` can write for these objects, whatever its random draws."""
    texts = {_full_caption(objects), *_templates(objects)}
    for a in objects:
        for b in objects:
            if a is not b:
                texts.update(_relations(a, b))
    return {t + "." for t in texts}


def text_to_image_ceiling(captions: dict[int, list[str]], scenes: dict[int, list[SceneObject]]) -> float:
    """Best expected text→image R@1 (%): a caption that fits k images is ranked first with probability 1/k.

    A partial caption such as "a large red circle." fits every image whose scene could have produced it, so even
    a model that reads every scene perfectly has to guess among those images.
    """
    possible = {image_id: possible_captions(objects) for image_id, objects in scenes.items()}
    scores = []
    for texts in captions.values():
        for text in texts:
            scores.append(1.0 / sum(text in fits for fits in possible.values()))
    return 100.0 * sum(scores) / len(scores)


def split_ceiling(out: str | Path, split: str) -> float:
    """:func:`text_to_image_ceiling` of one split of a folder written by :func:`generate` (scenes re-drawn)."""
    data = json.loads((Path(out) / f"captions_{split}.json").read_text())
    seed, holdout = data["info"]["seed"], bool(data["info"]["holdout"])
    captions: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    scenes = {i: sample_scene(random.Random(f"mlm-synth:{seed}:{i}"), split, holdout)[0] for i in captions}
    return text_to_image_ceiling(captions, scenes)
