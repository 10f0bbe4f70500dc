"""Synthetic benchmark: real COCO/VQAv2/Karpathy files, consistent annotations, hold-out split, determinism."""

import hashlib
import json
import random
import re
import time

import numpy as np
import pytest

from mlm.data import synthetic as S
from mlm.data.images import decode_image


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    sizes = S.generate(out, n_images=60, size=64, seed=3, holdout=True, workers=1)
    return out, sizes


def _digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_split_sizes_and_files(synth):
    out, sizes = synth
    assert sizes == {"train": 48, "val": 6, "test": 6, "compositional": 6}
    for split in sizes:
        for name in (f"captions_{split}.json", f"vqa_questions_{split}.json", f"vqa_annotations_{split}.json"):
            assert (out / name).is_file()
    assert len(list((out / "images").glob("*.png"))) == 66


def test_eval_images_fixes_val_and_test_sizes(tmp_path):
    assert S.split_sizes(10_000, holdout=True, eval_images=200) == {
        "train": 9600, "val": 200, "test": 200, "compositional": 200
    }  # fmt: skip
    assert S.generate(tmp_path, n_images=14, size=32, seed=0, holdout=False, eval_images=2) == {
        "train": 10, "val": 2, "test": 2
    }  # fmt: skip
    with pytest.raises(ValueError, match="--eval-images=7 leaves no training image"):
        S.generate(tmp_path / "x", n_images=14, size=32, eval_images=7)
    with pytest.raises(ValueError, match="--eval-images=0"):
        S.generate(tmp_path / "y", n_images=14, size=32, eval_images=0)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_captions_load_with_pycocotools(synth):
    from pycocotools.coco import COCO

    out, sizes = synth
    coco = COCO(str(out / "captions_train.json"))
    assert len(coco.getImgIds()) == 48 and len(coco.anns) == 48 * 5
    image_id = coco.getImgIds()[0]
    captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
    assert len(set(captions)) == 5
    img, _ = decode_image(out / "images" / coco.loadImgs(image_id)[0]["file_name"])
    assert img.size == (64, 64) and img.mode == "RGB"


def test_vqa_files_follow_the_vqav2_schema(synth):
    out, _ = synth
    questions = json.loads((out / "vqa_questions_val.json").read_text())
    annotations = json.loads((out / "vqa_annotations_val.json").read_text())
    assert {"info", "task_type", "data_type", "license", "data_subtype", "questions"} <= set(questions)
    assert {"info", "data_type", "license", "data_subtype", "annotations"} <= set(annotations)
    assert len(questions["questions"]) == len(annotations["annotations"]) == 6 * 5
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    for q in questions["questions"]:
        assert set(q) == {"image_id", "question", "question_id"}
        a = by_id[q["question_id"]]
        assert set(a) == {
            "question_id",
            "image_id",
            "question_type",
            "answer_type",
            "multiple_choice_answer",
            "answers",
        }
        assert a["image_id"] == q["image_id"] and a["answer_type"] in ("yes/no", "number", "other")
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in a["answers"])
        assert sum(x["answer"] == a["multiple_choice_answer"] for x in a["answers"]) >= 7
    kinds = {a["question_type"] for a in annotations["annotations"]}
    assert kinds == {"what color is the", "what shape is", "how many", "is there a", "where is the"}


def test_karpathy_file(synth):
    out, _ = synth
    data = json.loads((out / "dataset_synth.json").read_text())
    assert {im["split"] for im in data["images"]} == {"train", "val", "test", "compositional"}
    im = data["images"][0]
    assert set(im) == {"filepath", "filename", "split", "sentences", "sentids", "imgid", "cocoid"}
    assert [s["sentid"] for s in im["sentences"]] == im["sentids"] and len(im["sentences"]) == 5
    assert im["sentences"][0]["tokens"] == im["sentences"][0]["raw"].rstrip(".").replace(",", "").split()


FULL = re.compile(r"an? (small|large) (\w+) (\w+) at the ((?:top|middle|bottom) \w+|center)")


def test_full_caption_matches_pixels_and_holdout(synth):
    out, _ = synth
    data = json.loads((out / "dataset_synth.json").read_text())
    cell = 64 / 3
    for im in data["images"]:
        objects = FULL.findall(im["sentences"][0]["raw"])
        assert len(objects) in (1, 2, 3)
        pixels = np.asarray(decode_image(out / "images" / im["filename"])[0])
        pairs = {(color, shape) for _, color, shape, _ in objects}
        held = pairs & set(S.HOLDOUT)
        assert bool(held) == (im["split"] == "compositional"), (im["split"], pairs)
        for _, color, shape, position in objects:
            if shape in ("circle", "square"):  # the cell centre lies inside these whatever the jitter
                row, col = _cell(position)
                y, x = int((row + 0.5) * cell), int((col + 0.5) * cell)
                assert tuple(pixels[y, x]) == S.COLORS[color], (im["filename"], color, shape, position)


def _cell(position: str) -> tuple[int, int]:
    if position == "center":
        return 1, 1
    row, col = position.split()
    return S.ROWS.index(row), S.COLS.index(col)


def test_answers_agree_with_the_scene():
    for seed in range(40):
        rng = random.Random(seed)
        objects, _ = S.sample_scene(rng, "train", holdout=False)
        for q in S.make_questions(objects, rng):
            text, answer = q["question"], q["multiple_choice_answer"]
            if text.startswith("where is the"):
                color, shape = text[len("where is the ") : -1].split()
                assert answer == next(o.position for o in objects if (o.color, o.shape) == (color, shape))
            elif text.startswith("is there"):
                color, shape = text.rstrip("?").split()[-2:]
                assert answer == ("yes" if any((o.color, o.shape) == (color, shape) for o in objects) else "no")
            elif text == "how many objects are there?":
                assert answer == str(len(objects))
            elif text.startswith("what color is the shape at the"):
                pos = text[len("what color is the shape at the ") : -1]
                assert answer == next(o.color for o in objects if o.position == pos)
            elif text.startswith("what shape is at the"):
                assert answer == next(o.shape for o in objects if o.position == text[len("what shape is at the ") : -1])


def test_captions_fit_the_default_text_length(synth):
    from mlm.data.sources import open_source
    from mlm.data.tokenizer import MLMTokenizer

    out, _ = synth
    src = open_source(out, split="train")
    tok = MLMTokenizer.train_wordpiece(src.texts(), vocab_size=2000)
    assert tok.vocab_size < 300  # a small, regular vocabulary (letters and ## pieces included)
    longest = max(len(tok.encode(c)) for r in src for c in r.captions)
    assert longest <= 32


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    S.generate(tmp_path / "a", n_images=20, seed=7, workers=1)
    S.generate(tmp_path / "b", n_images=20, seed=7, workers=2)
    S.generate(tmp_path / "c", n_images=20, seed=8, workers=1)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="--images=5: need at least 10"):
        S.generate(tmp_path, n_images=5)
    with pytest.raises(ValueError, match="--size=8"):
        S.generate(tmp_path, n_images=10, size=8)


def test_no_holdout_means_no_compositional_split(tmp_path):
    assert S.generate(tmp_path, n_images=10, holdout=False) == {"train": 8, "val": 1, "test": 1}
    assert not (tmp_path / "captions_compositional.json").exists()


@pytest.mark.slow
def test_ten_thousand_images_under_a_minute(tmp_path):
    start = time.perf_counter()
    S.generate(tmp_path, n_images=10_000, workers=2)
    assert time.perf_counter() - start < 60


def test_shape_counts_use_english_plurals(synth):
    out, sizes = synth
    questions = [
        q["question"]
        for split in sizes
        for q in json.loads((out / f"vqa_questions_{split}.json").read_text())["questions"]
    ]
    counted = {m.group(1) for q in questions if (m := re.match(r"how many (\w+) are there\?", q))}
    assert counted - {"objects", "shapes"}, "no shape-count question was generated"
    assert counted <= {"objects", "shapes"} | {S._plural(s) for s in S.SHAPES}
    assert S._plural("cross") == "crosses" and S._plural("star") == "stars"
