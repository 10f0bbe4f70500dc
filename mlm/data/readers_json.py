"""JSON annotation formats: COCO captions, Karpathy splits, VQAv2 questions + annotations, and synth folders.

Each reader returns records and counts every bad entry in a :class:`SkipStats` under its reason, with the file and
the JSON path of the entry (``captions.json:annotations[12]``) in the message. ``load_json`` (the last file parsed is
kept, so detecting the format and reading the file parse it once) reports a malformed file at its line and column.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mlm.config import DataConfig
from mlm.data import records as R
from mlm.data.image_paths import ImageResolver
from mlm.data.records import DataError, Record, SkipStats, clean_text, read_text

NO_QUESTION = "no valid question"


def _require(data: dict, keys: tuple[str, ...], path: Path, what: str) -> None:
    """Raise a wrong-schema DataError naming the first missing key."""
    for key in keys:
        if key not in data:
            found = ", ".join(list(data)[:12]) or "none"
            raise DataError(R.WRONG_SCHEMA, str(path), f"missing key '{key}' ({what} needs {', '.join(keys)}); "
                                                       f"top-level keys: {found}")  # fmt: skip
        if not isinstance(data[key], list):
            raise DataError(R.WRONG_SCHEMA, f"{path}:{key}", f"expected a list, got {type(data[key]).__name__}")


def _folders(path: Path, cfg: DataConfig, sub: str | None = None) -> list[Path]:
    """Where images named in an annotation file may live."""
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    folders = [root, root / "images"]
    if sub:
        folders += [root / sub, root / "images" / sub, root.parent / sub, root.parent / "images" / sub]
    return folders


def _key(value) -> int | str | None:
    """An id usable as a dict key, or None."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _missing(item, keys: tuple[str, ...]) -> str | None:
    """A message naming the first missing key of a JSON entry, or None when all are there."""
    if not isinstance(item, dict):
        return f"expected an object, got {type(item).__name__}"
    for key in keys:
        if key not in item:
            return f"missing key '{key}'"
    return None


def read_coco(path: Path, cfg: DataConfig, stats: SkipStats) -> list[Record]:
    """A COCO captions file: one record per image with every caption of it."""
    data = json_object(path)
    _require(data, ("images", "annotations"), path, "a COCO captions file")
    sub = re.search(r"captions_(\w+)\.json$", path.name)
    resolver = ImageResolver(_folders(path, cfg, sub.group(1) if sub else None))
    by_id: dict = {}
    unusable = set()
    for i, image in enumerate(data["images"]):
        origin = f"{path}:images[{i}]"
        stats.read += 1
        problem = _missing(image, ("id", "file_name"))
        if not problem and _key(image["id"]) is None:
            problem = f"id {image['id']!r} is not an integer or string"
        if not problem and (not isinstance(image["file_name"], str) or not image["file_name"].strip()):
            problem = f"file_name {image['file_name']!r} is not a file name"
        if problem:
            stats.skip(R.WRONG_SCHEMA, origin, problem)
            continue
        if image["id"] in by_id or image["id"] in unusable:
            stats.skip(R.DUPLICATE_ID, origin, f"image id {image['id']} appears twice")
            continue
        found = resolver.find(image["file_name"])
        if found is None:
            unusable.add(image["id"])
            stats.skip(R.MISSING_IMAGE, origin, f"{image['file_name']} not found under {resolver.where()}")
            continue
        by_id[image["id"]] = Record(image=found, image_id=image["id"], origin=f"{origin} (id {image['id']})")
    for j, ann in enumerate(data["annotations"]):
        origin = f"{path}:annotations[{j}]"
        problem = _missing(ann, ("image_id", "caption"))
        if problem:
            stats.drop(R.WRONG_SCHEMA, origin, problem)
            continue
        record = by_id.get(_key(ann["image_id"]))
        if record is None:
            if _key(ann["image_id"]) not in unusable:
                stats.drop(R.WRONG_SCHEMA, origin, f"image_id {ann['image_id']!r} is not in images")
            continue
        text = clean_text(ann["caption"], origin, stats)
        if text is not None:
            record.captions.append(text)
    return _with_captions(by_id.values(), stats)


def _with_captions(records, stats: SkipStats) -> list[Record]:
    """Records that kept at least one caption; the others are counted."""
    kept = []
    for record in records:
        if record.captions:
            kept.append(record)
        else:
            stats.skip(R.NO_CAPTION, record.origin, "every caption of this image was empty or unusable")
    return kept


def read_karpathy(path: Path, cfg: DataConfig, split: str | None, stats: SkipStats) -> list[Record]:
    """A Karpathy split file (COCO, Flickr30k, Flickr8k, synth): ``split`` "train" includes "restval"."""
    data = json_object(path)
    _require(data, ("images",), path, "a Karpathy split file")
    name = str(data.get("dataset", ""))
    resolver = ImageResolver(_folders(path, cfg) + [path.parent / f"{name}-images", path.parent / name])
    wanted = None if split is None else ({split, "restval"} if split == "train" else {split})
    records, splits = [], set()
    for i, image in enumerate(data["images"]):
        origin = f"{path}:images[{i}]"
        if isinstance(image, dict):
            splits.add(str(image.get("split")))
            if wanted is not None and image.get("split") not in wanted:
                continue
        stats.read += 1
        problem = _missing(image, ("filename", "sentences"))
        if problem or not isinstance(image["sentences"], list):
            stats.skip(R.WRONG_SCHEMA, origin, problem or "'sentences' is not a list")
            continue
        folder = image.get("filepath") or ""
        found = resolver.find(f"{folder}/{image['filename']}" if folder else str(image["filename"]))
        found = found or resolver.find(str(image["filename"]))
        if found is None:
            stats.skip(R.MISSING_IMAGE, origin, f"{folder}/{image['filename']} not found under {resolver.where()}")
            continue
        captions = []
        for k, sent in enumerate(image["sentences"]):
            tokens = sent.get("tokens") if isinstance(sent, dict) else None
            joined = " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else ""
            raw = sent.get("raw", joined) if isinstance(sent, dict) else sent
            text = clean_text(raw, f"{origin}:sentences[{k}]", stats)
            if text is not None:
                captions.append(text)
        image_id = image.get("cocoid", image.get("imgid", i))
        records.append(Record(image=found, captions=captions, image_id=image_id, origin=origin))
    if wanted is not None and stats.read == 0:
        raise ValueError(f"{path}: no image has split {split!r}; splits present: {', '.join(sorted(splits))}")
    return _with_captions(records, stats)


def vqa_files(spec: str) -> tuple[Path, Path]:
    """(questions, annotations) for "q.json:a.json" or a questions file with its annotations beside it."""
    if not Path(spec).exists() and spec.count(":") == 1 and all(p.endswith(".json") for p in spec.split(":")):
        questions, annotations = (Path(p) for p in spec.split(":"))
        return questions, annotations
    questions = Path(spec)
    plain = questions.name.replace("questions", "annotations")
    names = [plain, plain.replace("OpenEnded_", ""), "annotations.json"]
    for name in names:
        if name != questions.name and (questions.parent / name).is_file():
            return questions, questions.parent / name
    raise FileNotFoundError(f"{questions}: no VQAv2 annotations file beside it (tried {', '.join(names)}); "
                            f"give both as questions.json:annotations.json")  # fmt: skip


def _answers_by_question(path: Path, stats: SkipStats) -> dict:
    data = json_object(path)
    _require(data, ("annotations",), path, "a VQAv2 annotations file")
    out = {}
    for j, ann in enumerate(data["annotations"]):
        problem = _missing(ann, ("question_id", "answers"))
        if problem or _key(ann["question_id"]) is None or not isinstance(ann["answers"], list):
            stats.drop(R.WRONG_SCHEMA, f"{path}:annotations[{j}]", problem or "bad question_id or answers")
            continue
        out[ann["question_id"]] = (j, ann)
    return out


def _vqa_answers(path: Path, j: int, ann: dict, stats: SkipStats) -> tuple[list[str], str | None]:
    """The cleaned answers of one annotation and its multiple_choice_answer."""
    answers = []
    for k, item in enumerate(ann["answers"]):
        value = item.get("answer") if isinstance(item, dict) else item
        text = clean_text(value, f"{path}:annotations[{j}].answers[{k}]", stats, what="answer")
        if text is not None:
            answers.append(text)
    best = ann.get("multiple_choice_answer")
    best = clean_text(best, f"{path}:annotations[{j}].multiple_choice_answer", stats, "answer") if best else None
    return answers, best


def read_vqa(questions_path: Path, answers_path: Path, cfg: DataConfig, stats: SkipStats) -> list[Record]:
    """VQAv2 questions + annotations: one record per question with its 10 answers."""
    data = json_object(questions_path)
    _require(data, ("questions",), questions_path, "a VQAv2 questions file")
    by_question = _answers_by_question(answers_path, stats)
    subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else None
    resolver = ImageResolver(_folders(questions_path, cfg, subtype))
    records = []
    for i, item in enumerate(data["questions"]):
        origin = f"{questions_path}:questions[{i}]"
        stats.read += 1
        problem = _missing(item, ("image_id", "question", "question_id"))
        if not problem and (not isinstance(item["image_id"], int) or _key(item["question_id"]) is None):
            problem = f"image_id {item['image_id']!r} must be an integer, question_id {item['question_id']!r} an id"
        if problem:
            stats.skip(R.WRONG_SCHEMA, origin, problem)
            continue
        question = clean_text(item["question"], origin, stats, what="question")
        if question is None:
            stats.skip(NO_QUESTION, origin, "the question text is unusable")
            continue
        if item["question_id"] not in by_question:
            stats.skip(R.NO_ANSWER, origin, f"question_id {item['question_id']} has no entry in {answers_path}")
            continue
        j, ann = by_question[item["question_id"]]
        answers, best = _vqa_answers(answers_path, j, ann, stats)
        if not answers and not best:
            stats.skip(R.NO_ANSWER, origin, f"every answer of question_id {item['question_id']} is unusable")
            continue
        image_id = item["image_id"]
        found = (resolver.find(f"COCO_{subtype}_{image_id:012d}.jpg") if subtype else None) or resolver.find_id(
            image_id
        )
        if found is None:
            stats.skip(R.MISSING_IMAGE, origin, f"no image file for image_id {image_id} under {resolver.where()}")
            continue
        records.append(
            Record(
                image=found,
                question=question,
                answers=answers or [best],
                answer=best,
                image_id=image_id,
                question_id=item["question_id"],
                question_type=ann.get("question_type"),
                answer_type=ann.get("answer_type"),
                origin=origin,
            )
        )
    return records


def read_synth(folder: Path, cfg: DataConfig, split: str | None, stats: SkipStats) -> list[Record]:
    """A folder written by ``mlm data synth``: caption records then VQA records of one split (default train)."""
    split = split or "train"
    captions = folder / f"captions_{split}.json"
    if not captions.is_file():
        present = sorted(p.stem.removeprefix("captions_") for p in folder.glob("captions_*.json"))
        raise ValueError(f"{folder}: no split {split!r} (no {captions.name}); splits present: {', '.join(present)}")
    records = read_coco(captions, cfg, stats)
    questions = folder / f"vqa_questions_{split}.json"
    if questions.is_file():
        records += read_vqa(*vqa_files(str(questions)), cfg, stats)
    return records


_JSON_CACHE: dict[tuple, Any] = {}


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a malformed one raises DataError at "file:line:column". The last file is cached."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    if key is not None and key in _JSON_CACHE:
        return _JSON_CACHE[key]
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(R.MALFORMED_JSON, f"{path}:{err.lineno}:{err.colno}", err.msg) from err
    except (ValueError, RecursionError) as err:  # e.g. a 5000-digit number, arrays nested 100000 deep
        raise DataError(R.MALFORMED_JSON, str(path), f"{type(err).__name__}: {str(err)[:200]}") from err
    _JSON_CACHE.clear()
    _JSON_CACHE[key] = data
    return data


def json_object(path: Path) -> dict:
    """A JSON file whose top level must be an object."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(R.WRONG_SCHEMA, str(path), f"top level is a JSON {type(data).__name__}, expected an object")
    return data
