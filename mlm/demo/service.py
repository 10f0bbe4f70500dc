"""What the demo does, without any web framework: checked uploads, captions, answers, attention maps and search.

:class:`DemoService` holds a loaded model and, when a folder is given, its search index; the Gradio app
(:mod:`mlm.demo.app`) only wires its methods to widgets, so everything here is testable without a browser. Uploads
are refused with a one-line reason when they exceed the size limit or do not decode as an image (the safe decoder
of :mod:`mlm.data.images` also guards against decompression bombs).
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path

import torch
from PIL import Image

from mlm.data.records import DataError
from mlm.eval import inference as infer
from mlm.model import MLMModel

logger = logging.getLogger(__name__)

MAX_UPLOAD_PIXELS = 50_000_000  # a photo of up to ~50 megapixels; more is refused before decoding


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
    ):
        if max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
        self.model = model.eval()
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.transform = infer.image_transform(model)
        self.out_dir = Path(tempfile.mkdtemp(prefix="mlm-demo-"))
        self.index = None
        if images_dir is not None:
            from mlm.eval.image_index import ImageIndex

            self.index = ImageIndex(images_dir, model, model_id, cache_dir)
            self.index.refresh()

    def load_upload(self, path: str | Path | None) -> tuple[Image.Image, torch.Tensor]:
        """The decoded RGB image and its pixels (1, 3, H, W); raises UploadError with a readable reason."""
        if not path:
            raise UploadError("upload an image first")
        path = Path(path)
        size = path.stat().st_size
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
        _, pixels = self.load_upload(path)
        return self.model.answer(pixels, [question.strip()], min_new_tokens=1)[0]

    def explain(self, path: str | Path | None, caption: str = "") -> tuple[str, Path]:
        """The caption explained (the model's own when empty) and the PNG of its attention maps."""
        from mlm.eval.attention_maps import attention_maps, plot_attention_maps

        image, pixels = self.load_upload(path)
        caption = caption.strip() if caption and caption.strip() else self.caption(path)
        out = self.out_dir / f"attention-{uuid.uuid4().hex[:12]}.png"
        plot_attention_maps(image, attention_maps(self.model, pixels, caption), out)
        return caption, out

    def search(self, text: str, k: int = 8) -> list[tuple[str, str]]:
        """(image path, "score · name") of the folder's k best images for the text."""
        if self.index is None:
            raise UploadError("no image folder to search: start the demo with --images DIR")
        if not text or not text.strip():
            raise UploadError("type a text to search for")
        return [(str(hit.path), f"{hit.score:.3f} · {hit.path.name}") for hit in self.index.search(text, int(k))]
