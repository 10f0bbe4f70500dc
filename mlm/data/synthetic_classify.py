"""The synthetic benchmark's classification view: single-object scenes labelled by shape and by colour.

``mlm data synth`` writes ``classify/{k:06d}.png`` and two CSV files over the same images, ``classify_shape.csv``
and ``classify_color.csv`` (columns ``filepath``, ``label``), each with the prompt templates it is meant to be read
with (``classify_shape_templates.txt`` ...), in the wording of the benchmark's captions. ``mlm eval --task zeroshot
--data DIR/classify_shape.csv`` then measures what the embeddings know of each attribute alone. Scenes draw from
their own seeded ``random.Random`` (like the captioned splits) and avoid the held-out colour-shape pairs.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from mlm.data.synthetic import HOLDOUT, SHAPES, SceneObject
from mlm.data.synthetic_render import BACKGROUNDS, COLORS, SIZES, render

VIEWS = {  # view -> templates in the captions' wording ("a large red circle.", "a red shape at ...")
    "shape": ("a {}.", "a small {}.", "a large {}.", "one object: a {}.", "there is one shape: a {}."),
    "color": ("a {} shape.", "a small {} shape.", "a large {} shape.", "one object: a {} shape."),
}
FOLDER = "classify"


def single_object_scene(seed: int, index: int, holdout: bool) -> tuple[SceneObject, int, random.Random]:
    """One object in a random cell (not a held-out pair when ``holdout``), a background and the scene's rng."""
    rng = random.Random(f"mlm-synth-classify:{seed}:{index}")
    banned = set(HOLDOUT) if holdout else set()
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in banned:
            break
    cell = rng.randrange(9)
    obj = SceneObject(shape, color, rng.choice(tuple(SIZES)), cell // 3, cell % 3)
    return obj, rng.randrange(len(BACKGROUNDS)), rng


def write_classification(out: str | Path, n_images: int, size: int, seed: int = 0, holdout: bool = True) -> list[Path]:
    """Write ``n_images`` single-object scenes and the shape/colour CSV + templates files; returns the CSV paths."""
    if n_images < 1:
        raise ValueError(f"--classify-images={n_images}: need at least one image (0 skips the view)")
    out = Path(out)
    (out / FOLDER).mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n_images):
        obj, background, rng = single_object_scene(seed, index, holdout)
        name = f"{FOLDER}/{index:06d}.png"
        render([obj], background, size, rng).save(out / name, format="PNG", compress_level=1)
        rows.append((name, obj))
    paths = []
    for view, templates in VIEWS.items():
        path = out / f"{FOLDER}_{view}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["filepath", "label"])
            writer.writerows((name, getattr(obj, view)) for name, obj in rows)
        path.with_name(f"{path.stem}_templates.txt").write_text("\n".join(templates) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
