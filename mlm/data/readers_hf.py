"""Parquet files and ``save_to_disk`` folders (Arrow), read through HF ``datasets`` as a lazily indexed Source.

Rows stay in the memory-mapped Arrow table; only the caption column is read when the source opens (to check and
count bad captions), and a row's image (embedded bytes or a path) is fetched when the record is used. The image and
caption columns are chosen as for the other tables (:func:`mlm.data.readers_table.pick_column`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from mlm.data import records as R
from mlm.data.image_paths import ImageResolver
from mlm.data.readers_table import CAPTION_KEYS, IMAGE_KEYS, pick_column
from mlm.data.records import DataError, Record, SkipStats, clean_text
from mlm.data.shards import expand_shards
from mlm.data.source import Source

logger = logging.getLogger(__name__)


def _load(spec: str, kind: str, split: str | None):
    """The ``datasets.Dataset`` of a parquet spec or a ``save_to_disk`` folder (a DatasetDict gives one split)."""
    import datasets

    try:
        if kind == "parquet":
            files = expand_shards(spec) if not Path(spec).is_dir() else sorted(map(str, Path(spec).glob("*.parquet")))
            missing = [f for f in files if not Path(f).is_file()]
            if not files or missing:
                raise FileNotFoundError(f"parquet file not found: {', '.join(missing) or spec}")
            return datasets.load_dataset("parquet", data_files=files, split="train")
        loaded = datasets.load_from_disk(spec)
    except (FileNotFoundError, DataError):
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow/datasets raise many types on damaged files
        raise DataError(R.TRUNCATED_FILE, spec, f"datasets could not read it: {type(err).__name__}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split if split in loaded else ("train" if split is None and "train" in loaded else None)
        if chosen is None and split is None and len(names) == 1:
            chosen = names[0]
        if chosen is None:
            raise ValueError(f"{spec}: split {split!r} not found; the saved DatasetDict has {names}")
        return loaded[chosen]
    return loaded


class HFSource(Source):
    """A ``datasets.Dataset`` with an image column (Image feature, path or bytes) and a caption column."""

    def __init__(self, spec: str, kind: str, ds, image_key: str, caption_key: str, root: Path, stats: SkipStats):
        import datasets

        super().__init__(spec, kind, [], stats)
        self.image_key, self.caption_key = image_key, caption_key
        feature = ds.features[image_key]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(image_key, datasets.Image(decode=False))  # we decode safely ourselves
        self.ds = ds
        self.resolver = ImageResolver([root, root / "images"])
        self.rows: list[int] = []
        self.captions: list[list[str]] = []
        paths = (
            ds[image_key]
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
            else None
        )
        for row, value in enumerate(ds[caption_key]):
            stats.read += 1
            origin = f"{spec}:row {row}"
            values = value if isinstance(value, list) else [value]
            captions = [c for v in values if (c := clean_text(v, f"{origin}:{caption_key}", stats)) is not None]
            if not captions:
                stats.skip(R.NO_CAPTION, origin, f"'{caption_key}' has no usable caption")
                continue
            if paths is not None and self._path(paths[row]) is None:
                stats.skip(R.MISSING_IMAGE, origin, f"{paths[row]!r} not found under {self.resolver.where()}")
                continue
            self.rows.append(row)
            self.captions.append(captions)

    def _path(self, name: str | None) -> str | None:
        if not name:
            return None
        return name if Path(name).is_absolute() and Path(name).is_file() else self.resolver.find(name)

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, value) -> str | bytes | None:
        """Embedded bytes, else a resolvable path, else None (decoding then reports a missing image)."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            return self._path(value.get("path")) or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            return self._path(value) or value
        return None

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.rows[index]
        value = self.ds[row][self.image_key]
        return Record(
            image=self._image(value), captions=self.captions[index], image_id=row, origin=f"{self.name}:row {row}"
        )

    def texts(self) -> Iterator[str]:
        for captions in self.captions:
            yield from captions


def read_hf(spec: str, kind: str, image_key: str, caption_key: str, image_root: str, split, stats) -> HFSource:
    """Open a parquet file/pattern/folder (kind "parquet") or a ``save_to_disk`` folder (kind "arrow")."""
    ds = _load(spec, kind, split)
    columns = list(ds.column_names)
    image_key = pick_column(columns, image_key, IMAGE_KEYS, "image", spec)
    caption_key = pick_column(columns, caption_key, CAPTION_KEYS, "caption", spec)
    base = Path(spec) if Path(spec).is_dir() else Path(expand_shards(spec)[0]).parent
    return HFSource(spec, kind, ds, image_key, caption_key, Path(image_root) if image_root else base, stats)
