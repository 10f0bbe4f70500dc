"""What the demo does, without any web framework: checked uploads, captions, answers, attention maps and search.

:class:`DemoService` holds a loaded model and, when a folder is given, its search index; the Gradio app
(:mod:`mlm.demo.app`) only wires its methods to widgets, so everything here is testable without a browser. Uploads
are refused with a one-line reason when they exceed the size limit or do not decode as an image (the safe decoder
of :mod:`mlm.data.images` also guards against decompression bombs).

Each service owns one temporary folder, ``mlm-demo-*``: ``maps/`` holds the newest attention-map PNGs (older ones
are deleted as new ones come) and ``gradio/`` is Gradio's upload cache (``GRADIO_TEMP_DIR``) unless the user set
that variable. :meth:`DemoService.close` (or leaving its ``with`` block, or the interpreter's exit) removes it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import deque
from pathlib import Path

import torch
from PIL import Image

from mlm import inference as infer
from mlm.data.records import DataError
from mlm.data.text import check_text
from mlm.model import MLMModel

logger = logging.getLogger(__name__)

MAX_UPLOAD_PIXELS = 50_000_000  # a photo of up to ~50 megapixels; more is refused before decoding
MAX_ATTENTION_MAPS = 32  # PNGs kept; Gradio serves its own cached copy of each, so old ones are not needed
GRADIO_TEMP_DIR = "GRADIO_TEMP_DIR"  # where Gradio caches uploads and outputs (default: /tmp/gradio, never cleaned)

_OWN_GRADIO_DIRS: set[str] = set()  # GRADIO_TEMP_DIR values this process's services set, as opposed to the user's


class UploadError(ValueError):
    """An upload the demo refuses: too large, or not an image."""


class DemoService:
    """A model (and optionally an image folder's search index) behind the demo's buttons."""

    def __init__(
        self,
        model: MLMModel,
        model_id: str,
        images_dir: str | Path | None = None,
        max_upload_mb: float = 10.0,
        cache_dir: str | Path | None = None,
        max_maps: int = MAX_ATTENTION_MAPS,
    ):
        if max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
        if max_maps < 1:
            raise ValueError(f"max_maps must be at least 1, got {max_maps}")
        self.model = model.eval()
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_maps = max_maps
        self.transform = infer.image_transform(model)
        self.index = None
        if images_dir is not None:
            from mlm.eval.image_index import ImageIndex

            self.index = ImageIndex(images_dir, model, model_id, cache_dir)
            self.index.refresh()
        self._make_temp_root()  # last, so that a bad folder or model above leaves no temporary folder behind

    def _make_temp_root(self) -> None:
        """Make the service's temporary folder and point GRADIO_TEMP_DIR into it, unless the user has set it."""
        self.temp_root = Path(tempfile.mkdtemp(prefix="mlm-demo-"))
        self._remove_root = functools.partial(shutil.rmtree, self.temp_root, ignore_errors=True)
        atexit.register(self._remove_root)  # in case close() is never reached
        self.out_dir = self.temp_root / "maps"
        self.out_dir.mkdir()
        self._maps: deque[Path] = deque()
        self._maps_lock = threading.Lock()  # Gradio may run two explain calls at once in its worker threads
        self._previous_gradio_dir = os.environ.get(GRADIO_TEMP_DIR) or None
        self.owns_gradio_dir = self._previous_gradio_dir is None or self._previous_gradio_dir in _OWN_GRADIO_DIRS
        if self.owns_gradio_dir:
            self.gradio_dir = self.temp_root / "gradio"
            self.gradio_dir.mkdir()
            # Gradio reads it as each component, and the server, is made: so before build_app() and launch().
            os.environ[GRADIO_TEMP_DIR] = str(self.gradio_dir)
            _OWN_GRADIO_DIRS.add(str(self.gradio_dir))
        else:
            self.gradio_dir = Path(self._previous_gradio_dir)  # the user's choice: used, never deleted

    def close(self) -> None:
        """Delete the temporary folder (attention maps and our Gradio cache) and give GRADIO_TEMP_DIR back."""
        if self.owns_gradio_dir and os.environ.get(GRADIO_TEMP_DIR) == str(self.gradio_dir):
            # Another live service's folder is handed back; anything else was ours to set, so unset it.
            if self._previous_gradio_dir in _OWN_GRADIO_DIRS:
                os.environ[GRADIO_TEMP_DIR] = self._previous_gradio_dir
            else:
                os.environ.pop(GRADIO_TEMP_DIR, None)
        _OWN_GRADIO_DIRS.discard(str(self.gradio_dir))
        self._remove_root()
        atexit.unregister(self._remove_root)

    def __enter__(self) -> DemoService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load_upload(self, path: str | Path | None) -> tuple[Image.Image, torch.Tensor]:
        """The decoded RGB image and its pixels (1, 3, H, W); raises UploadError with a readable reason."""
        if not path:
            raise UploadError("upload an image first")
        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            # Gradio's cache sweep deletes old uploads; a page left open for long still names them.
            raise UploadError(f"{path.name} is no longer on the server; upload it again") from None
        if size > self.max_upload_bytes:
            raise UploadError(f"{path.name} is {size / 2**20:.1f} MB; the upload limit is {self.max_upload_mb:g} MB")
        try:
            image = infer.decode_any(path, MAX_UPLOAD_PIXELS, origin=path.name)
        except DataError as err:
            raise UploadError(f"{path.name} is not a usable image ({err.reason}): {err.detail}") from err
        return image, self.transform(image)[None]

    @torch.no_grad()
    def caption(self, path: str | Path | None, num_beams: int = 1) -> str:
        """The model's caption of an uploaded image (never empty: EOS may not come first)."""
        _, pixels = self.load_upload(path)
        return self.model.generate(pixels, num_beams=num_beams, min_new_tokens=1)[0]

    @torch.no_grad()
    def ask(self, path: str | Path | None, question: str) -> str:
        """The model's answer to a question about an uploaded image."""
        if not question or not question.strip():
            raise UploadError("type a question first")
        question = check_text(question, "question")
        infer.check_question(self.model, question)
        _, pixels = self.load_upload(path)
        return self.model.answer(pixels, [question], min_new_tokens=1)[0]

    def explain(self, path: str | Path | None, caption: str = "") -> tuple[str, Path]:
        """The caption explained (the model's own when empty) and the PNG of its attention maps."""
        from mlm.eval.attention_maps import attention_maps, plot_attention_maps

        image, pixels = self.load_upload(path)
        caption = caption.strip() if caption and caption.strip() else self.caption(path)
        out = self.out_dir / f"attention-{uuid.uuid4().hex[:12]}.png"
        plot_attention_maps(image, attention_maps(self.model, pixels, caption), out)
        with self._maps_lock:
            self._maps.append(out)
            while len(self._maps) > self.max_maps:
                self._maps.popleft().unlink(missing_ok=True)
        return caption, out

    def search(self, text: str, k: int = 8) -> list[tuple[str, str]]:
        """(image path, "score · name") of the folder's k best images for the text."""
        if self.index is None:
            raise UploadError("no image folder to search: start the demo with --images DIR")
        if not text or not text.strip():
            raise UploadError("type a text to search for")
        hits = self.index.search(check_text(text, "search text"), int(k))
        return [(str(hit.path), f"{hit.score:.3f} · {hit.path.name}") for hit in hits]
