"""Webdataset tar shards, as img2dataset writes them: ``key.jpg`` + ``key.txt`` (or ``key.json``) per sample.

A spec is one ``.tar``, a folder of them, or a brace pattern (``shard-{000..009}.tar``, see :mod:`mlm.data.shards`).
Shards are indexed when the source opens; image bytes stay in the shard (a :class:`FileSlice`) and are read on use.
A shard that is truncated keeps the samples before the damage, and one that cannot be opened is counted.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from mlm.data import records as R
from mlm.data.records import FileSlice, Record, SkipStats, clean_text
from mlm.data.shards import expand_shards

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_EXTS = ("txt", "caption", "cap")
MISSING_FILE = "missing file"


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
