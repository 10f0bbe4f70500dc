"""A bare folder of images (format ``images``): every image-named file under it, as a caption-less record.

``mlm data check`` decodes these records to find the bad files (the last spec of ``scan_folder``), and the search
index of :mod:`mlm.eval.image_index` lists a folder's images this way. Hidden files and folders are left out.
"""

from __future__ import annotations

from pathlib import Path

from mlm.data.images import IMAGE_SUFFIXES, SAFE_FORMATS
from mlm.data.records import Record, SkipStats

EXTRA_IMAGE_SUFFIXES = (".jfif", ".jpe", ".heic", ".heif", ".avif")


def read_image_files(folder: Path, stats: SkipStats) -> list[Record]:
    """Every image-named file under a folder, as caption-less records (``mlm data check`` decodes them)."""
    from PIL import Image

    Image.init()
    safe = {ext for ext, fmt in Image.registered_extensions().items() if fmt in SAFE_FORMATS}
    suffixes = set(IMAGE_SUFFIXES + EXTRA_IMAGE_SUFFIXES) | safe
    records = []
    for path in sorted(folder.rglob("*")):
        hidden = any(p.startswith(".") for p in path.relative_to(folder).parts)
        if path.suffix.lower() in suffixes and not hidden and (path.is_file() or path.is_symlink()):
            stats.read += 1
            records.append(Record(image=str(path), origin=str(path)))
    return records
