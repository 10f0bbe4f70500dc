"""Image-path + caption tables: CSV/TSV with a header row, JSON Lines, and HF ``imagefolder`` metadata.

Each row names one image (relative to the image root) and its caption. The columns are ``data.csv_img_key`` and
``data.csv_caption_key`` (open_clip's ``filepath``/``title``), else the first common name present; the parquet and
Arrow reader picks its columns the same way. These formats are read line by line (not through ``datasets``, whose
builders stop at the first malformed line or non-UTF-8 caption) so that one bad line is skipped and counted with its
line number while the rest of the file still loads.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from mlm.data import records as R
from mlm.data.image_paths import ImageResolver
from mlm.data.records import DataError, Record, SkipStats, clean_text, read_text

IMAGE_KEYS = ("filepath", "image", "image_path", "file_name", "filename", "img", "path", "jpg", "png")
CAPTION_KEYS = ("title", "caption", "text", "captions", "sentence", "sentences", "txt")


def pick_column(columns: list[str], configured: str, fallbacks: tuple[str, ...], what: str, where: str) -> str:
    """The configured column if present, else the first common name present; raises naming the columns seen."""
    if configured in columns:
        return configured
    for name in fallbacks:
        if name in columns:
            return name
    raise DataError(
        R.WRONG_SCHEMA, where, f"no {what} column: '{configured}' (or any of {', '.join(fallbacks)}) not in {columns}"
    )


def row_record(
    row: dict, image_key: str, caption_key: str, origin: str, resolver: ImageResolver, stats: SkipStats
) -> Record | None:
    """A Record from one table row, or None after counting why the row was skipped."""
    stats.read += 1
    image = row.get(image_key)
    if not isinstance(image, str) or not image.strip():
        stats.skip(R.WRONG_SCHEMA, origin, f"missing or empty '{image_key}' (image path), got {image!r}")
        return None
    if re.match(r"^[a-z]+://", image):
        stats.skip(R.MISSING_IMAGE, origin, f"{image} is a URL; download images first (e.g. with img2dataset)")
        return None
    path = resolver.find(image.strip())
    if path is None:
        stats.skip(R.MISSING_IMAGE, origin, f"{image} not found under {resolver.where()}")
        return None
    value = row.get(caption_key)
    values = value if isinstance(value, list) else [value]
    captions = [c for v in values if (c := clean_text(v, f"{origin}:{caption_key}", stats)) is not None]
    if not captions:
        stats.skip(R.NO_CAPTION, origin, f"'{caption_key}' has no usable caption")
        return None
    return Record(image=path, captions=captions, image_id=image.strip(), origin=origin)


def read_table(path: Path, sep: str, image_key: str, caption_key: str, root: Path, stats: SkipStats) -> list[Record]:
    """CSV/TSV with a header row; each row is one image path and one caption (open_clip's csv convention)."""
    lines = read_text(path).splitlines(keepends=True)
    if sep not in lines[0] and sep != ",":
        sep = ","  # a .csv that is not tab-separated after all
    reader = csv.reader(lines, delimiter=sep)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise DataError(R.MALFORMED_LINE, f"{path}:1", f"unreadable header: {err}") from err
    image_key = pick_column(header, image_key, IMAGE_KEYS, "image", f"{path}:1")
    caption_key = pick_column(header, caption_key, CAPTION_KEYS, "caption", f"{path}:1")
    resolver = ImageResolver([root])
    records = []
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            stats.read += 1
            stats.skip(R.MALFORMED_LINE, f"{path}:{reader.line_num}", str(err))
            continue
        origin = f"{path}:{reader.line_num}"
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            stats.read += 1
            stats.skip(R.MALFORMED_LINE, origin, f"expected {len(header)} fields, got {len(fields)}")
            continue
        record = row_record(dict(zip(header, fields, strict=True)), image_key, caption_key, origin, resolver, stats)
        if record is not None:
            records.append(record)
    return records


def iter_jsonl(path: Path, stats: SkipStats) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each good line; malformed, non-UTF-8 and non-object lines are counted."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(R.EMPTY_FILE, str(path), f"{len(raw)} bytes, no content")
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            stats.read += 1
            stats.skip(R.NON_UTF8, origin, f"byte {line[err.start : err.start + 1]!r} at column {err.start + 1}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            stats.read += 1
            stats.skip(R.MALFORMED_JSON, f"{origin}:{err.colno}", err.msg)
            continue
        except (ValueError, RecursionError) as err:
            stats.read += 1
            stats.skip(R.MALFORMED_JSON, origin, f"{type(err).__name__}: {str(err)[:200]}")
            continue
        if not isinstance(obj, dict):
            stats.read += 1
            stats.skip(R.WRONG_SCHEMA, origin, f"expected a JSON object per line, got {type(obj).__name__}")
            continue
        yield lineno, obj


def read_jsonl(path: Path, image_key: str, caption_key: str, root: Path, stats: SkipStats) -> list[Record]:
    """JSON Lines: one object per line with an image path and a caption (string or list of strings)."""
    resolver = ImageResolver([root])
    keys: tuple[str, str] | None = None
    records = []
    for lineno, obj in iter_jsonl(path, stats):
        if keys is None:
            # columns are chosen from the first good line, like a header
            columns = list(obj)
            keys = (
                pick_column(columns, image_key, IMAGE_KEYS, "image", f"{path}:{lineno}"),
                pick_column(columns, caption_key, CAPTION_KEYS, "caption", f"{path}:{lineno}"),
            )
        record = row_record(obj, keys[0], keys[1], f"{path}:{lineno}", resolver, stats)
        if record is not None:
            records.append(record)
    return records


def read_imagefolder(folder: Path, caption_key: str, split: str | None, stats: SkipStats) -> list[Record]:
    """An HF ``imagefolder``: images plus ``metadata.jsonl`` (or ``metadata.csv``) with a ``file_name`` column."""
    if split and (folder / split).is_dir():
        folder = folder / split
    if (folder / "metadata.jsonl").is_file():
        return read_jsonl(folder / "metadata.jsonl", "file_name", caption_key, folder, stats)
    if (folder / "metadata.csv").is_file():
        return read_table(folder / "metadata.csv", ",", "file_name", caption_key, folder, stats)
    raise FileNotFoundError(f"{folder}: an imagefolder needs metadata.jsonl or metadata.csv beside the images")
