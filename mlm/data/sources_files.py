"""Line-level readers: CSV/TSV and JSONL tables, HF ``imagefolder`` metadata, and webdataset tar shards.

Also the shared pieces of every source: the :class:`Source` sequence, image-path resolution, and JSON loading that
reports malformed files with their line and column. These formats are read line by line (not through
``datasets``, whose builders stop at the first malformed line or non-UTF-8 caption) so that one bad line is
skipped and counted with its line number while the rest of the file still loads.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mlm.data import records as R
from mlm.data.images import IMAGE_SUFFIXES
from mlm.data.records import DataError, FileSlice, Record, SkipStats, clean_text
from mlm.data.shards import expand_shards

IMAGE_KEYS = ("filepath", "image", "image_path", "file_name", "filename", "img", "path", "jpg", "png")
CAPTION_KEYS = ("title", "caption", "text", "captions", "sentence", "sentences", "txt")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_EXTS = ("txt", "caption", "cap")
MISSING_FILE = "missing file"


class Source(Sequence[Record]):
    """Records from one annotation source with its skip counts; images are decoded only when used."""

    def __init__(self, name: str, kind: str, records: list[Record], stats: SkipStats):
        self.name = name
        self.kind = kind
        self.records = records
        self.stats = stats

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def texts(self) -> Iterator[str]:
        """Every caption, question and answer: the text a tokenizer is trained on."""
        for record in self:
            yield from record.captions
            if record.question:
                yield record.question
                yield from record.answers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, records={len(self)})"


class ConcatSource(Source):
    """Several sources read as one; their counts are merged."""

    def __init__(self, parts: list[Source]):
        stats = SkipStats(strict=parts[0].stats.strict)
        for part in parts:
            stats.merge(part.stats)
        super().__init__(" + ".join(p.name for p in parts), "+".join(p.kind for p in parts), [], stats)
        self.parts = parts
        self._offsets = [0]
        for part in parts:
            self._offsets.append(self._offsets[-1] + len(part))

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = next(i for i in range(len(self.parts)) if index < self._offsets[i + 1])
        return self.parts[part][index - self._offsets[part]]

    def texts(self) -> Iterator[str]:
        for part in self.parts:
            yield from part.texts()


class ImageResolver:
    """Finds the image files that annotations name, under a few candidate folders; lists each folder once."""

    def __init__(self, folders: list[Path]):
        self.folders = list(dict.fromkeys(Path(f) for f in folders))
        self._listings: dict[Path, set[str]] = {}
        self._by_id: dict[int, str] | None = None

    def _names(self, folder: Path) -> set[str]:
        if folder not in self._listings:
            try:
                self._listings[folder] = set(os.listdir(folder))
            except OSError:
                self._listings[folder] = set()
        return self._listings[folder]

    def find(self, name: str) -> str | None:
        """Full path of an image named relative to one of the folders (or absolute); None when absent."""
        path = Path(name)
        candidates = [path] if path.is_absolute() else [folder / path for folder in self.folders]
        for full in candidates:
            if full.name in self._names(full.parent):
                return str(full)
        return None

    def find_id(self, image_id: int) -> str | None:
        """The image file whose name ends in the id's digits (COCO_val2014_000000262148.jpg, 000000493652.jpg)."""
        if self._by_id is None:
            self._by_id = {}
            for folder in self.folders:
                for name in sorted(self._names(folder)):
                    match = re.search(r"(\d+)\.[A-Za-z]+$", name)
                    if match and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        self._by_id.setdefault(int(match.group(1)), str(folder / name))
        return self._by_id.get(int(image_id))

    def where(self) -> str:
        """The folders searched, for messages."""
        return ", ".join(str(f) for f in self.folders) or "(no folder)"


def read_text(path: Path) -> str:
    """File text as UTF-8 (BOM stripped); undecodable bytes are kept as surrogates so fields can be checked."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(R.EMPTY_FILE, str(path), f"{len(data)} bytes, no content")
    return data.decode("utf-8-sig", errors="surrogateescape")


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


def _wds_caption(members: dict, tar: tarfile.TarFile, origin: str, stats: SkipStats) -> list[str]:
    """Caption(s) of one webdataset sample: .txt/.caption, else the "caption"/"text" field of .json."""
    for ext in WDS_TEXT_EXTS:
        if ext in members:
            text = clean_text(tar.extractfile(members[ext]).read(), f"{origin}.{ext}", stats)
            return [text] if text else []
    if "json" in members:
        try:
            meta = json.loads(tar.extractfile(members["json"]).read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            stats.drop(R.MALFORMED_JSON, f"{origin}.json", str(err))
            return []
        value = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        text = clean_text(value, f"{origin}.json:caption", stats) if value is not None else None
        return [text] if text else []
    return []


def _group_members(tar: tarfile.TarFile, shard: str, stats: SkipStats) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Members grouped by sample key (path up to the first dot of the file name), then by extension."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        for member in tar:
            if member.isfile():
                folder, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                samples.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member
    except (tarfile.TarError, OSError, EOFError) as err:
        stats.read += 1
        stats.skip(R.TRUNCATED_FILE, shard, f"{err}; kept the {len(samples)} samples before it")
    return samples


def _shard_record(shard: str, key: str, members: dict, tar: tarfile.TarFile, stats: SkipStats) -> Record | None:
    """The record of one sample, or None after counting why it was skipped."""
    origin = f"{shard}:{key}"
    stats.read += 1
    image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    if image_ext is None:
        stats.skip(R.MISSING_IMAGE, origin, f"no image member ({', '.join(WDS_IMAGE_EXTS)}); has {sorted(members)}")
        return None
    try:
        captions = _wds_caption(members, tar, origin, stats)
    except (tarfile.TarError, OSError, EOFError) as err:
        stats.skip(R.TRUNCATED_FILE, origin, f"caption member unreadable: {err}")
        return None
    if not captions:
        stats.skip(R.NO_CAPTION, origin, f"no usable .txt/.json caption (has {sorted(members)})")
        return None
    image = members[image_ext]
    return Record(
        FileSlice(shard, image.offset_data, image.size), captions, image_id=key, origin=f"{origin}.{image_ext}"
    )


def _read_shard(shard: str, stats: SkipStats) -> list[Record]:
    """Records of one tar shard; image bytes stay in the shard and are read on access."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            samples = _group_members(tar, shard, stats)
            records = [_shard_record(shard, key, members, tar, stats) for key, members in samples.items()]
    except (tarfile.TarError, OSError, EOFError) as err:
        stats.read += 1
        stats.skip(R.TRUNCATED_FILE if Path(shard).is_file() else MISSING_FILE, shard, str(err))
        return []
    return [r for r in records if r is not None]


def read_webdataset(spec: str, stats: SkipStats) -> list[Record]:
    """Tar shards as img2dataset writes them (``key.jpg`` + ``key.txt``, optional ``key.json``)."""
    shards = expand_shards(spec)
    if not shards or not any(Path(s).is_file() for s in shards):
        raise FileNotFoundError(f"no webdataset shard found for {spec!r}")
    records = []
    for shard in shards:
        records.extend(_read_shard(shard, stats))
    return records
