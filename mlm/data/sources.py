"""Opening a data source: the format names, detection from the path, and ``open_source``, which calls the reader.

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

Each family has its reader module, and this module is the only one that imports them (the readers import only
:mod:`~mlm.data.records`, :mod:`~mlm.data.source` and :mod:`~mlm.data.image_paths`, never this module):
:mod:`~mlm.data.readers_json` (COCO, Karpathy, VQAv2, synth), :mod:`~mlm.data.readers_table` (CSV/TSV, JSONL,
imagefolder), :mod:`~mlm.data.readers_hf` (parquet, Arrow), :mod:`~mlm.data.readers_webdataset` (tar shards) and
:mod:`~mlm.data.readers_images` (a bare folder of images). A reader returns a list of records, which
``open_source`` wraps in a :class:`~mlm.data.source.Source`, or a Source of its own.
"""

from __future__ import annotations

from pathlib import Path

from mlm.config import DataConfig
from mlm.data import records as R
from mlm.data.images import IMAGE_SUFFIXES
from mlm.data.readers_images import read_image_files
from mlm.data.readers_json import json_object, read_coco, read_karpathy, read_synth, read_vqa, vqa_files
from mlm.data.readers_table import read_imagefolder, read_jsonl, read_table
from mlm.data.readers_webdataset import read_webdataset
from mlm.data.records import DataError, Record, SkipStats
from mlm.data.source import ConcatSource, Source

__all__ = ["FORMATS", "open_source", "detect_format", "scan_folder"]

FORMATS = ("auto", "coco", "karpathy", "vqav2", "csv", "tsv", "jsonl", "imagefolder", "parquet", "arrow",
           "webdataset", "synth", "images")  # fmt: skip


def _json_kind(path: Path) -> str:
    """coco | karpathy | vqav2 from the keys of a JSON file; a wrong schema names what is missing."""
    data = json_object(path)
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
    from mlm.data.readers_hf import read_hf

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
