"""The image-path resolver: finds the image files that annotations name, under a few candidate folders.

Each folder is listed once and names are looked up in that listing, so resolving every image of a large annotation
file costs one directory read per folder, not one ``stat`` per image. VQAv2 images can also be found by the id
digits that end their names (``COCO_val2014_000000262148.jpg``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlm.data.images import IMAGE_SUFFIXES


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
