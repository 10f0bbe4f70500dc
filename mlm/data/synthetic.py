"""The built-in synthetic benchmark: PIL-drawn scenes written as real COCO-captions, VQAv2 and Karpathy files.

Each image holds 1-3 objects (6 shapes, 8 colours, 2 sizes) in distinct cells of a 3x3 grid on a varied
background. Each image gets 5 different captions (one full description naming every object's size, colour, shape
and cell; four partial ones: counts, attributes, positions, "left of"/"above" relations) and one VQAv2-style
question of each type (colour, shape, count, yes/no, position) with 10 answers. With ``holdout`` some
colour-shape pairs never appear in train/val/test and make up a ``compositional`` test split instead.

Every image draws from its own ``random.Random`` seeded by (seed, image id), so output is byte-identical for a
seed whatever the number of worker processes. The vocabulary is small and regular on purpose: a tiny model
should reach high retrieval and VQA accuracy on it within minutes of CPU training.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path

from mlm.data.synthetic_render import BACKGROUNDS, COLORS, SIZES, render

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three")
# one held-out shape per colour: every colour and every shape still appears in train, only these pairs do not
HOLDOUT = tuple((color, SHAPES[(2 * i + 1) % len(SHAPES)]) for i, color in enumerate(COLORS))
SPLITS = ("train", "val", "test")
DATE = "2024-01-01 00:00:00"


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: attributes and its grid cell."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        """Grid cell name: "top left", "center", "middle right", ..."""
        if self.row == 1 and self.col == 1:
            return "center"
        return f"{ROWS[self.row]} {COLS[self.col]}"

    def phrase(self, size: bool = True, color: bool = True, shape: bool = True) -> str:
        """Noun phrase such as "large red circle" with the chosen attributes ("shape" when none)."""
        words = [self.size] * size + [self.color] * color + [self.shape if shape else "shape"]
        return " ".join(words)


def position_name(row: int, col: int) -> str:
    """Grid cell name for a row and column (0-2 each)."""
    return SceneObject("", "", "", row, col).position


def sample_scene(rng: random.Random, split: str, holdout: bool) -> tuple[list[SceneObject], int]:
    """Objects in reading order and a background index; held-out pairs only (and always) in ``compositional``."""
    n_objects = rng.choice((1, 2, 3))
    cells = sorted(rng.sample(range(9), n_objects))
    banned = set(HOLDOUT) if holdout and split != "compositional" else set()
    forced = rng.randrange(n_objects) if split == "compositional" else -1
    objects, pairs = [], set()
    for k, cell in enumerate(cells):
        while True:
            color, shape = rng.choice(HOLDOUT) if k == forced else (rng.choice(list(COLORS)), rng.choice(SHAPES))
            if (color, shape) not in banned and (color, shape) not in pairs:
                break
        pairs.add((color, shape))
        objects.append(SceneObject(shape, color, rng.choice(tuple(SIZES)), cell // 3, cell % 3))
    return objects, rng.randrange(len(BACKGROUNDS))


def _join(phrases: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange star"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _plural(noun: str) -> str:
    """English plural of a shape name: "circles", "crosses"."""
    return f"{noun}es" if noun.endswith(("s", "x", "sh", "ch")) else f"{noun}s"


def _at(obj: SceneObject) -> str:
    return f"at the {obj.position}"


def _relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Every true spatial relation between two objects in different cells."""
    options = []
    if a.col != b.col:
        left, right = (a, b) if a.col < b.col else (b, a)
        options += [f"the {left.phrase(size=False)} is left of the {right.phrase(size=False)}"]
        options += [f"the {right.phrase(size=False)} is right of the {left.phrase(size=False)}"]
    if a.row != b.row:
        top, bottom = (a, b) if a.row < b.row else (b, a)
        options += [f"the {top.phrase(size=False)} is above the {bottom.phrase(size=False)}"]
        options += [f"the {bottom.phrase(size=False)} is below the {top.phrase(size=False)}"]
    return options


def _relation(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """A true spatial relation between two objects in different cells."""
    return rng.choice(_relations(a, b))


def _full_caption(objects: list[SceneObject]) -> str:
    """The caption naming every object's size, colour, shape and cell."""
    return _join([f"{_a(o.phrase())} {_at(o)}" for o in objects])


def _templates(objects: list[SceneObject]) -> list[str]:
    """The partial captions that need no random choice (relations are drawn separately)."""
    n = len(objects)
    noun = "object" if n == 1 else "objects"
    pool = [
        f"{NUMBERS[n]} {noun}: " + _join([_a(o.phrase(size=False)) for o in objects]),
        _join([_a(o.phrase()) for o in objects]),
        _join([f"{_a(o.phrase(size=False, color=False))} {_at(o)}" for o in objects]),
        _join([f"{_a(o.phrase(size=False, shape=False))} {_at(o)}" for o in objects]),
        _join([f"{_a(o.phrase(color=False))} {_at(o)}" for o in objects]),
        f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} {'shape' if n == 1 else 'shapes'}: "
        + _join([f"{_a(o.phrase(size=False))} {_at(o)}" for o in objects]),
    ]
    if n == 1:
        pool += [f"a single {objects[0].phrase()}", f"only one {objects[0].phrase(size=False)} {_at(objects[0])}"]
    return pool


def make_captions(objects: list[SceneObject], rng: random.Random) -> list[str]:
    """Five different captions: the full description first, then four partial ones drawn from varied templates."""
    pool = _templates(objects)
    if len(objects) > 1:
        pool += [_relation(*rng.sample(objects, 2), rng) for _ in range(3)]
    rng.shuffle(pool)
    captions = [_full_caption(objects)]
    for text in pool:
        if text not in captions and len(captions) < 5:
            captions.append(text)
    return [c + "." for c in captions]


def _answers(answer: str, variants: list[str], rng: random.Random) -> list[dict]:
    """Ten VQAv2 answers: mostly the canonical one, a few in another form ("two" for "2")."""
    n_variant = rng.randrange(0, 4) if variants else 0
    texts = [answer] * (10 - n_variant) + [rng.choice(variants) for _ in range(n_variant)]
    rng.shuffle(texts)
    return [
        {"answer": t, "answer_confidence": "yes" if rng.random() < 0.9 else "maybe", "answer_id": i + 1}
        for i, t in enumerate(texts)
    ]


def make_questions(objects: list[SceneObject], rng: random.Random) -> list[dict]:
    """One question per type (colour, shape, count, yes/no, position) with its VQAv2 fields and 10 answers."""
    target = rng.choice(objects)
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    out = []

    def add(question: str, answer: str, qtype: str, atype: str, variants: list[str] | None = None) -> None:
        out.append({"question": question, "multiple_choice_answer": answer, "question_type": qtype,
                    "answer_type": atype, "answers": _answers(answer, variants or [], rng)})  # fmt: skip

    if shapes.count(target.shape) == 1 and rng.random() < 0.5:
        add(f"what color is the {target.shape}?", target.color, "what color is the", "other")
    else:
        add(f"what color is the shape at the {target.position}?", target.color, "what color is the", "other")
    target = rng.choice(objects)
    if colors.count(target.color) == 1 and rng.random() < 0.5:
        add(f"what shape is {target.color}?", target.shape, "what shape is", "other")
    else:
        add(f"what shape is at the {target.position}?", target.shape, "what shape is", "other")
    kind = rng.randrange(3)
    if kind == 0:
        count, question = len(objects), "how many objects are there?"
    elif kind == 1:
        # mostly colours that are present, so that counts are not nearly always 0
        color = rng.choice(colors) if rng.random() < 0.7 else rng.choice(list(COLORS))
        count, question = colors.count(color), f"how many {color} shapes are there?"
    else:
        shape = rng.choice(shapes) if rng.random() < 0.7 else rng.choice(SHAPES)
        count, question = shapes.count(shape), f"how many {_plural(shape)} are there?"
    add(question, str(count), "how many", "number", [NUMBERS[count]])
    if rng.random() < 0.5:
        obj = rng.choice(objects)
        add(f"is there {_a(obj.color)} {obj.shape}?", "yes", "is there a", "yes/no")
    else:
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
        add(f"is there {_a(color)} {shape}?", "no", "is there a", "yes/no")
    target = rng.choice(objects)
    variants = [target.position.replace(" ", "-")] if " " in target.position else []
    add(f"where is the {target.color} {target.shape}?", target.position, "where is the", "other", variants)
    return out


def make_example(seed: int, image_id: int, split: str, size: int, holdout: bool) -> tuple[bytes, list, list]:
    """PNG bytes, 5 captions and the questions of one image; depends only on (seed, image_id, split, ...)."""
    rng = random.Random(f"mlm-synth:{seed}:{image_id}")
    objects, background = sample_scene(rng, split, holdout)
    img = render(objects, background, size, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; zlib output is still deterministic
    return buf.getvalue(), make_captions(objects, rng), make_questions(objects, rng)


def _write_example(args: tuple) -> tuple[list, list]:
    """Make one image, write its PNG into the images folder (in the worker, so file writes run in parallel)."""
    out, seed, image_id, split, size, holdout = args
    png, captions, questions = make_example(seed, image_id, split, size, holdout)
    (Path(out) / "images" / f"{image_id:012d}.png").write_bytes(png)
    return captions, questions


def split_sizes(n_images: int, holdout: bool, eval_images: int | None = None) -> dict[str, int]:
    """train/val/test of n_images (80/10/10, or ``eval_images`` each for val and test), plus a compositional split
    as large as test when holding out."""
    n_val = n_test = n_images // 10 if eval_images is None else eval_images
    if n_images - n_val - n_test < 1:
        raise ValueError(f"--eval-images={eval_images} leaves no training image out of --images={n_images}")
    sizes = {"train": n_images - n_val - n_test, "val": n_val, "test": n_test}
    if holdout:
        sizes["compositional"] = n_test
    return sizes


def _info(split: str, seed: int, holdout: bool) -> dict:
    return {
        "description": f"mlm synthetic shapes benchmark, split {split}",
        "url": "",
        "version": "1.0",
        "year": 2024,
        "contributor": "mlm data synth",
        "date_created": DATE,
        "seed": seed,
        "holdout": [list(p) for p in HOLDOUT] if holdout else [],
    }


LICENSE = {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


class _SplitWriter:
    """Accumulates the COCO, VQAv2 and Karpathy entries of one split."""

    def __init__(self, split: str):
        self.split = split
        self.images, self.captions, self.questions, self.annotations = [], [], [], []

    def add(self, image_id: int, file_name: str, size: int, captions: list[str], questions: list[dict], karpathy):
        self.images.append({"id": image_id, "file_name": file_name, "width": size, "height": size, "license": 1,
                            "date_captured": DATE, "coco_url": "", "flickr_url": ""})  # fmt: skip
        sentences, sentids = [], []
        for text in captions:
            ann_id = len(karpathy["sentences"])
            self.captions.append({"image_id": image_id, "id": ann_id, "caption": text})
            tokens = text.replace(",", " ").replace(":", " ").replace(".", " ").split()
            sentences.append({"tokens": tokens, "raw": text, "imgid": len(karpathy["images"]), "sentid": ann_id})
            sentids.append(ann_id)
            karpathy["sentences"].append(ann_id)
        karpathy["images"].append({"filepath": "images", "filename": file_name, "imgid": len(karpathy["images"]),
                                   "split": self.split, "sentences": sentences, "sentids": sentids,
                                   "cocoid": image_id})  # fmt: skip
        for k, q in enumerate(questions):
            question_id = image_id * 1000 + k
            self.questions.append({"image_id": image_id, "question": q["question"], "question_id": question_id})
            self.annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    **{key: q[key] for key in ("question_type", "answer_type", "multiple_choice_answer", "answers")},
                }
            )

    def write(self, out: Path, seed: int, holdout: bool) -> list[Path]:
        info = _info(self.split, seed, holdout)
        vqa_head = {"info": info, "task_type": "Open-Ended", "data_type": "synth", "license": LICENSE,
                    "data_subtype": self.split}  # fmt: skip
        files = {
            f"captions_{self.split}.json": {"info": info, "licenses": [LICENSE], "images": self.images,
                                            "annotations": self.captions},
            f"vqa_questions_{self.split}.json": {**vqa_head, "questions": self.questions},
            f"vqa_annotations_{self.split}.json": {**{k: v for k, v in vqa_head.items() if k != "task_type"},
                                                   "annotations": self.annotations},
        }  # fmt: skip
        for name, content in files.items():
            (out / name).write_text(json.dumps(content, separators=(",", ":")))
        return [out / name for name in files]


def generate(
    out: str | Path,
    n_images: int = 2000,
    size: int = 64,
    seed: int = 0,
    holdout: bool = True,
    workers: int = 1,
    eval_images: int | None = None,
) -> dict[str, int]:
    """Write the benchmark into ``out``; returns the number of images per split (``eval_images``: val and test
    size each, default a tenth of n_images).

    Files: ``images/{id:012d}.png``, ``captions_{split}.json`` (COCO), ``vqa_questions_{split}.json`` +
    ``vqa_annotations_{split}.json`` (VQAv2) per split, and ``dataset_synth.json`` (Karpathy, all splits).
    """
    if n_images < 10:
        raise ValueError(f"--images={n_images}: need at least 10 images for train/val/test splits")
    if size < 16:
        raise ValueError(f"--size={size}: images smaller than 16 pixels cannot show a 3x3 grid of shapes")
    if eval_images is not None and eval_images < 1:
        raise ValueError(f"--eval-images={eval_images}: val and test need at least one image each")
    sizes = split_sizes(n_images, holdout, eval_images)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs, image_id = [], 0
    for split, count in sizes.items():
        for _ in range(count):
            image_id += 1
            jobs.append((str(out), seed, image_id, split, size, holdout))
    writers = {split: _SplitWriter(split) for split in sizes}
    karpathy = {"images": [], "sentences": []}
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            _collect(jobs, pool.imap(_write_example, jobs, chunksize=64), writers, karpathy, size)
    else:
        _collect(jobs, map(_write_example, jobs), writers, karpathy, size)
    for writer in writers.values():
        writer.write(out, seed, holdout)
    dataset = {"dataset": "synth", "holdout": [list(p) for p in HOLDOUT] if holdout else [],
               "images": karpathy["images"]}  # fmt: skip
    (out / "dataset_synth.json").write_text(json.dumps(dataset, separators=(",", ":")))
    logger.debug("wrote %d synthetic images to %s: %s", n_images, out, sizes)
    return sizes


def _collect(jobs: list, results, writers: dict, karpathy: dict, size: int) -> None:
    """Add each image's entries to its split, in image-id order."""
    for (_, _, image_id, split, _, _), (captions, questions) in zip(jobs, results, strict=True):
        writers[split].add(image_id, f"{image_id:012d}.png", size, captions, questions, karpathy)
