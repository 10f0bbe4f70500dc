"""Data sources: every annotation format becomes a :class:`Source`, a sequence of :class:`Record` with skip counts.

``open_source(spec, cfg, split)`` reads, with ``data.format: auto`` detecting the kind from the path:

- COCO captions JSON (``info``/``images``/``annotations``) — one record per image with all its captions;
- Karpathy JSON (``images[].sentences``; COCO, Flickr30k, Flickr8k, ``dataset_synth.json``) — ``split`` picks
  train (which includes ``restval``), val or test;
- VQAv2: the questions file, its annotations found beside it (``questions`` → ``annotations`` in the name, also
  the official ``v2_OpenEnded_mscoco_*`` → ``v2_mscoco_*``), or both given as ``questions.json:annotations.json``
  — one record per question, images found by id (``COCO_{subtype}_{id:012d}.jpg`` or any name ending in the id);
- CSV/TSV/JSONL tables with an image-path and a caption column (``data.csv_img_key``/``csv_caption_key``, open_clip's
  ``filepath``/``title`` by default, common names as fallback);
- HF ``imagefolder`` (a folder with ``metadata.jsonl``/``metadata.csv``), parquet, ``save_to_disk`` folders, and
  webdataset tar shards (``*.tar``, a folder of them, or a brace pattern ``shard-{000..009}.tar``);
- a folder written by ``mlm data synth`` (``dataset_synth.json`` inside): COCO captions + VQAv2 of one split;
- several of these joined with ``+``.

Image paths are relative to ``data.image_root`` (default: the annotation file's folder; ``images/`` and COCO's
``train2017``-style folders beside it are tried too). Images are only listed at open time and decoded on use.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlm.config import DataConfig
from mlm.data import records as R
from mlm.data.images import IMAGE_SUFFIXES
from mlm.data.records import DataError, Record, SkipStats, clean_text
from mlm.data.sources_files import (
    ConcatSource,
    ImageResolver,
    Source,
    load_json,
    read_imagefolder,
    read_jsonl,
    read_table,
    read_webdataset,
)

__all__ = ["FORMATS", "Source", "ConcatSource", "open_source", "detect_format", "scan_folder"]

FORMATS = ("auto", "coco", "karpathy", "vqav2", "csv", "tsv", "jsonl", "imagefolder", "parquet", "arrow",
           "webdataset", "synth", "images")  # fmt: skip
NO_QUESTION = "no valid question"
EXTRA_IMAGE_SUFFIXES = (".jfif", ".jpe", ".heic", ".heif", ".avif")


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
    data = _json_object(path)
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
    data = _json_object(path)
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
    data = _json_object(path)
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
    data = _json_object(questions_path)
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


def _json_object(path: Path) -> dict:
    """A JSON file whose top level must be an object."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(R.WRONG_SCHEMA, str(path), f"top level is a JSON {type(data).__name__}, expected an object")
    return data


def read_image_files(folder: Path, stats: SkipStats) -> list[Record]:
    """Every image-named file under a folder, as caption-less records (``mlm data check`` decodes them)."""
    from PIL import Image

    Image.init()
    suffixes = set(IMAGE_SUFFIXES + EXTRA_IMAGE_SUFFIXES) | set(Image.registered_extensions())
    records = []
    for path in sorted(folder.rglob("*")):
        hidden = any(p.startswith(".") for p in path.relative_to(folder).parts)
        if path.suffix.lower() in suffixes and not hidden and (path.is_file() or path.is_symlink()):
            stats.read += 1
            records.append(Record(image=str(path), origin=str(path)))
    return records


def _json_kind(path: Path) -> str:
    """coco | karpathy | vqav2 from the keys of a JSON file; a wrong schema names what is missing."""
    data = _json_object(path)
    if "questions" in data:
        return "vqav2"
    images = data.get("images")
    if images is not None:
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return "karpathy"
        if "annotations" in data or not isinstance(images, list):
            return "coco"  # the COCO reader names what is wrong with images/annotations
        raise DataError(R.WRONG_SCHEMA, str(path), "has 'images' but no 'annotations' (COCO captions) and no "
                                                   "'sentences' in images[0] (Karpathy)")  # fmt: skip
    anns = data.get("annotations")
    if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "question_id" in anns[0]:
        raise DataError(
            R.WRONG_SCHEMA,
            str(path),
            "this is a VQAv2 annotations file: give its questions file "
            "(annotations are found beside it) or questions.json:annotations.json",
        )
    keys = ", ".join(list(data)[:12]) or "none"
    raise DataError(R.WRONG_SCHEMA, str(path), f"missing key 'images' or 'questions': not a COCO captions, Karpathy "
                                               f"or VQAv2 questions file; top-level keys: {keys}")  # fmt: skip


def _only(names: set[str], suffix: str) -> bool:
    """True when a folder holds files with this suffix and no other annotation or image file (a shard folder)."""
    others = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".tar", ".parquet") + IMAGE_SUFFIXES
    found = {Path(n).suffix.lower() for n in names}
    return suffix in found and not (found - {suffix}) & set(others)


def detect_format(spec: str) -> str:
    """The format of a source from its path (and, for JSON, its top-level keys)."""
    path = Path(spec)
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        subdirs_meta = any((path / n / "metadata.jsonl").is_file() for n in names if (path / n).is_dir())
        rules = [("synth", "dataset_synth.json" in names),
                 ("imagefolder", bool({"metadata.jsonl", "metadata.csv"} & names) or subdirs_meta),
                 ("arrow", bool({"dataset_info.json", "dataset_dict.json", "state.json"} & names)),
                 ("webdataset", _only(names, ".tar")),
                 ("parquet", _only(names, ".parquet"))]  # fmt: skip
        for kind, hit in rules:
            if hit:
                return kind
        raise ValueError(
            f"{path}: cannot tell the data format of this folder (no dataset_synth.json, metadata.jsonl, "
            f"dataset_info.json, *.tar or *.parquet); set data.format or name an annotation file"
        )
    if not path.exists():
        if spec.count(":") == 1 and all(p.endswith(".json") for p in spec.split(":")):
            return "vqav2"
        if any(c in spec for c in "{*?["):
            return "parquet" if ".parquet" in spec else "webdataset"
        raise FileNotFoundError(f"data source not found: {spec}")
    suffix = path.suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                 ".tar": "webdataset"}  # fmt: skip
    if suffix == ".json":
        return _json_kind(path)
    if suffix in by_suffix:
        return by_suffix[suffix]
    raise ValueError(f"{spec}: cannot tell the format from the name; set data.format to one of {', '.join(FORMATS)}")


def _read(spec: str, fmt: str, cfg: DataConfig, split: str | None, stats: SkipStats) -> Source | list[Record]:
    """Records (or a lazily indexed Source) of one spec in a known format."""
    path = Path(spec)
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    if fmt == "coco":
        return read_coco(path, cfg, stats)
    if fmt == "karpathy":
        return read_karpathy(path, cfg, split, stats)
    if fmt == "vqav2":
        return read_vqa(*vqa_files(spec), cfg, stats)
    if fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else cfg.csv_separator
        return read_table(path, sep, cfg.csv_img_key, cfg.csv_caption_key, root, stats)
    if fmt == "jsonl":
        return read_jsonl(path, cfg.csv_img_key, cfg.csv_caption_key, root, stats)
    if fmt == "imagefolder":
        return read_imagefolder(path, cfg.csv_caption_key, split, stats)
    if fmt == "webdataset":
        return read_webdataset(spec, stats)
    if fmt == "synth":
        return read_synth(path, cfg, split, stats)
    if fmt == "images":
        return read_image_files(path, stats)
    from mlm.data.sources_hf import read_hf

    return read_hf(spec, fmt, cfg.csv_img_key, cfg.csv_caption_key, cfg.image_root, split, stats)


def open_source(spec: str, cfg: DataConfig | None = None, split: str | None = None) -> Source:
    """Open a data source (see the module docstring for specs and formats); bad records are counted in ``.stats``.

    Raises DataError (a file that cannot be read at all, or any problem under ``data.strict``),
    FileNotFoundError or ValueError, each naming the file and line/field.
    """
    cfg = cfg or DataConfig()
    spec = str(spec).strip()
    if not spec:
        raise ValueError("no data source given (set data.train / data.val / data.test or pass a path)")
    if "+" in spec and not Path(spec).exists():
        return ConcatSource([open_source(part.strip(), cfg, split) for part in spec.split("+") if part.strip()])
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format={cfg.format!r} is not allowed; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(spec) if cfg.format == "auto" else cfg.format
    stats = SkipStats(strict=cfg.strict)
    result = _read(spec, fmt, cfg, split, stats)
    return result if isinstance(result, Source) else Source(spec, fmt, result, stats)


def scan_folder(folder: str | Path) -> list[tuple[str, str | None]]:
    """(spec, format) pairs to check in a folder that is not one dataset: each annotation file, then its images.

    VQAv2 annotation files are read with their questions file; a folder holding ``metadata.jsonl`` is checked as an
    imagefolder. The last pair, ``(folder, "images")``, decodes every image-named file.
    """
    folder = Path(folder)
    specs: list[tuple[str, str | None]] = []
    annotation_suffixes = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".tar")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    names = {str(p) for p in files}
    for path in files:
        if path.suffix.lower() not in annotation_suffixes:
            continue
        if path.name in ("metadata.jsonl", "metadata.csv"):
            specs.append((str(path.parent), "imagefolder"))
        elif "annotations" in path.name and any(
            str(path.parent / path.name.replace("annotations", q)) in names
            for q in ("questions", "OpenEnded_questions")
        ):
            continue  # read together with its questions file
        elif path.name not in ("dataset_info.json", "state.json", "dataset_dict.json"):
            specs.append((str(path), None))
    specs.append((str(folder), "images"))
    return specs
