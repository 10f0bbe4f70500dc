"""Text-to-image search over a folder: image embeddings cached on disk, ranked by cosine similarity.

The cache is one safetensors file per (folder, model): the embeddings (N, E) plus, in its metadata, the key of every
file (path relative to the folder, modification time in ns, size in bytes) and the model id. Refreshing the index
encodes only images whose key is new or changed, reuses the others and forgets deleted ones, so searching a folder a
second time encodes nothing. Files that do not decode are remembered by key too and retried only when they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mlm import inference as infer
from mlm.data.records import SkipStats
from mlm.model import MLMModel

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MLM_CACHE/search``, else ``$XDG_CACHE_HOME/mlm/search``, else ``~/.cache/mlm/search``."""
    if os.environ.get("MLM_CACHE"):
        return Path(os.environ["MLM_CACHE"]) / "search"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlm" / "search"


def file_key(folder: Path, path: Path) -> str:
    """``relative/path|mtime_ns|size``: changes whenever the file is replaced or edited."""
    stat = path.stat()
    return f"{path.relative_to(folder).as_posix()}|{stat.st_mtime_ns}|{stat.st_size}"


@dataclass
class SearchHit:
    """One result of a search."""

    path: Path
    score: float  # cosine similarity of the text and image embeddings


class ImageIndex:
    """Cached image embeddings of every image under a folder, for one model."""

    def __init__(self, folder: str | Path, model: MLMModel, model_id: str, cache_dir: str | Path | None = None):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        self.model, self.model_id = model, model_id
        digest = hashlib.sha1(str(self.folder).encode()).hexdigest()[:12]
        self.cache_file = Path(cache_dir or default_cache_dir()) / f"{self.folder.name}-{digest}-{model_id}.safetensors"
        self.paths: list[Path] = []
        self.embeds = torch.zeros(0, model.config.embed_dim)  # (N, E)
        self.bad: dict[str, str] = {}  # key -> why the file is not an image

    def _load_cache(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Cached embeddings and bad files by key; nothing when there is no cache or it belongs to another model."""
        from safetensors import safe_open

        if not self.cache_file.is_file():
            return {}, {}
        try:
            with safe_open(str(self.cache_file), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("model_id") != self.model_id:
                    return {}, {}
                keys = json.loads(meta["keys"])
                embeds = f.get_tensor("embeds")
                bad = json.loads(meta.get("bad", "{}"))
            dim = self.model.config.embed_dim
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and isinstance(bad, dict)):
                raise ValueError("keys or bad files of the wrong type")
            if embeds.dtype != torch.float32 or tuple(embeds.shape) != (len(keys), dim):
                raise ValueError(
                    f"embeddings {embeds.dtype} {tuple(embeds.shape)}, expected float32 ({len(keys)}, {dim})"
                )
            if not bool(torch.isfinite(embeds).all()):
                raise ValueError("non-finite embeddings")
            bad = {str(k): str(v) for k, v in bad.items()}
        except Exception as err:  # noqa: BLE001 - a broken or tampered cache is rebuilt, never fatal
            logger.warning("rebuilding the search cache %s: %s", self.cache_file, err)
            return {}, {}
        return dict(zip(keys, embeds, strict=True)), bad

    def _save_cache(self, keys: list[str]) -> None:
        """Write the embeddings and keys atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_file

        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model_id": self.model_id, "folder": str(self.folder), "keys": json.dumps(keys)}
        meta["bad"] = json.dumps(self.bad)
        tmp = self.cache_file.with_suffix(".tmp")
        save_file({"embeds": self.embeds.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, self.cache_file)

    def refresh(self, batch_size: int = 32) -> dict[str, int]:
        """Bring the index up to date with the folder; returns counts of images reused, encoded and bad."""

        from tqdm.auto import tqdm

        files, keys, unreadable = self._scan()
        cached, bad = self._load_cache()
        todo = [i for i, key in enumerate(keys) if key not in cached and key not in bad]
        errors: dict[int, str] = {}
        fresh: dict[str, torch.Tensor] = {}
        transform = infer.image_transform(self.model)
        batches = infer.image_batches([files[i] for i in todo], transform, batch_size, errors=errors)
        total = -(-len(todo) // batch_size)
        for index, pixels in tqdm(batches, total=total, desc="index", unit="batch", disable=None, leave=False):
            for j, embed in zip(index, infer.embed_images(self.model, pixels), strict=True):
                fresh[keys[todo[j]]] = embed
        present = set(keys)
        self.bad = {key: why for key, why in bad.items() if key in present}
        self.bad.update({keys[todo[j]]: why for j, why in errors.items()})
        self.bad.update(unreadable)
        found = {**cached, **fresh}
        rows = [i for i, key in enumerate(keys) if key in found]
        self.paths = [files[i] for i in rows]
        self.embeds = torch.stack([found[keys[i]] for i in rows]) if rows else self.embeds[:0]
        changed = bool(fresh or errors) or set(cached) != {keys[i] for i in rows} or set(bad) != set(self.bad)
        if changed:
            self._save_cache([keys[i] for i in rows])
        counts = {"images": len(rows), "reused": len(rows) - len(fresh), "encoded": len(fresh), "bad": len(self.bad)}
        logger.debug("search index of %s: %s", self.folder, counts)
        return counts

    def _scan(self) -> tuple[list[Path], list[str], dict[str, str]]:
        """The folder's image files and their keys, and {key: reason} for names that cannot be read (a dangling
        link, a file removed or made unreadable while scanning)."""
        from mlm.data.readers_images import read_image_files

        files, keys, unreadable = [], [], {}
        for record in read_image_files(self.folder, SkipStats()):
            path = Path(record.image)
            try:
                keys.append(file_key(self.folder, path))
                files.append(path)
            except OSError as err:
                why = "a dangling symbolic link" if path.is_symlink() else f"unreadable ({err.strerror})"
                unreadable[f"{path.relative_to(self.folder).as_posix()}|unreadable"] = f"{path}: {why}"
        return files, keys, unreadable

    def search(self, text: str, k: int = 5) -> list[SearchHit]:
        """The k images most similar to the text, best first (call :meth:`refresh` first)."""
        if not text.strip():
            raise ValueError("the search text is empty")
        if len(self.paths) == 0:
            return []
        query = infer.embed_texts(self.model, [text])  # (1, E)
        scores = (query @ self.embeds.T)[0]  # (N,)
        top = torch.sort(scores, descending=True, stable=True).indices[: max(1, k)]
        return [SearchHit(self.paths[i], float(scores[i])) for i in top.tolist()]
