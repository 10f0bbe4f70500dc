"""Fixture builders for data tests: small images of every awkward kind, written into tmp_path."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def image_bytes(kind: str = "rgb", size=(24, 16)) -> bytes:
    """Encoded bytes of one image kind: rgb, cmyk, la, palette, i16, exif6 (rotated), bomb, truncated, text, empty."""
    buf = io.BytesIO()
    if kind == "rgb":
        Image.new("RGB", size, (200, 40, 40)).save(buf, format="JPEG")
    elif kind == "png":
        Image.new("RGB", size, (40, 40, 200)).save(buf, format="PNG")
    elif kind == "cmyk":
        Image.new("CMYK", size, (0, 255, 255, 0)).save(buf, format="JPEG")
    elif kind == "la":
        Image.new("LA", size, (90, 128)).save(buf, format="PNG")
    elif kind == "palette":
        Image.new("P", size, 3).save(buf, format="PNG")
    elif kind == "i16":
        Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)).save(buf, format="PNG")
    elif kind == "exif6":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", size, (10, 200, 10)).save(buf, format="JPEG", exif=exif.tobytes())
    elif kind == "bomb":
        return png_header(20_000, 20_000)
    elif kind == "truncated":
        data = image_bytes("rgb", (64, 64))
        return data[: len(data) // 2]
    elif kind == "text":
        return b"<html>not found</html>\n"
    elif kind == "empty":
        return b""
    else:
        raise KeyError(kind)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and carries no pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


BAD_IMAGES = {"empty.jpg": "empty", "truncated.jpg": "truncated", "page.png": "text", "bomb.png": "bomb"}
ODD_IMAGES = {"cmyk.jpg": "cmyk", "la.png": "la", "palette.png": "palette", "i16.png": "i16", "rotated.jpg": "exif6"}


def write_images(folder: Path, names: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, kind in names.items():
        (folder / name).write_bytes(image_bytes(kind))


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """COCO captions with one problem of each caption kind; images/ holds good, odd and bad files."""
    write_images(tmp_path / "images", {"a.jpg": "rgb", "b.png": "png", **ODD_IMAGES, **BAD_IMAGES})
    names = ["a.jpg", "b.png", *ODD_IMAGES, *BAD_IMAGES, "missing.jpg"]
    images = [{"id": i + 1, "file_name": n, "width": 24, "height": 16} for i, n in enumerate(names)]
    anns = [{"image_id": i + 1, "id": 100 + i, "caption": f"a photo number {i}"} for i in range(len(names))]
    anns += [
        {"image_id": 1, "id": 200, "caption": "   "},  # empty
        {"image_id": 1, "id": 201, "caption": "word " * 400},  # overlong -> truncated
        {"image_id": 2, "id": 202, "caption": "bad \udcff bytes"},  # stands for non-UTF-8 (see test)
        {"image_id": 99, "id": 203, "caption": "orphan"},  # unknown image
        {"image_id": 2, "id": 204},  # no caption key
    ]
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    text = json.dumps(data).replace('"bad \\udcff bytes"', '"bad \udcff bytes"')
    (tmp_path / "captions.json").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    return tmp_path


@pytest.fixture(scope="module")
def synth_source(tmp_path_factory):
    """The training split of a 20-image synthetic folder."""
    from mlm.data.sources import open_source
    from mlm.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_images=20, seed=1)
    return open_source(out, split="train")


@pytest.fixture(scope="module")
def tok(synth_source):
    """A WordPiece tokenizer trained on that split's text."""
    from mlm.data.tokenizer import MLMTokenizer

    return MLMTokenizer.train_wordpiece(synth_source.texts(), vocab_size=500)
