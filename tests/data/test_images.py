"""Safe image decoding: every bad-image class gets its reason; every mode becomes RGB; EXIF orientation applies."""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlm.data import records as R
from mlm.data.images import decode_image, to_rgb
from mlm.data.records import DataError


def _jpeg_bytes(size=(32, 24), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but carries no pixel data (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _reason(image, **kw) -> str:
    with pytest.raises(DataError) as info:
        decode_image(image, **kw)
    return info.value.reason


def test_good_jpeg_path_decodes_to_rgb(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg_bytes())
    img, notes = decode_image(path)
    assert img.mode == "RGB" and img.size == (32, 24) and notes == []
    assert abs(int(np.asarray(img)[10, 10, 0]) - 200) < 8


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jpg: empty image file: 0 bytes"):
        decode_image(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="missing image: no such file: .*nope.png") as info:
        decode_image(tmp_path / "nope.png", origin="ann.json:images[3]")
    assert str(info.value).startswith("ann.json:images[3]: ")


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes((64, 64))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path) == R.TRUNCATED_IMAGE


def test_text_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(DataError, match=r"not an image: 22 bytes starting b'this is not '"):
        decode_image(path)


def test_decompression_bomb_header_rejected_before_decoding():
    assert _reason(_png_header_only(20_000, 20_000)) == R.IMAGE_TOO_LARGE


def test_configurable_pixel_limit():
    with pytest.raises(DataError, match=r"image too large: 32x24 = 768 pixels > max 500"):
        decode_image(_jpeg_bytes(), max_pixels=500)
    assert decode_image(_jpeg_bytes(), max_pixels=768)[0].size == (32, 24)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),  # cyan+magenta-free ink = red
        (lambda: Image.new("L", (8, 8), 77), (77, 77, 77)),
        (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
        (lambda: Image.new("LA", (8, 8), (10, 0)), (255, 255, 255)),  # fully transparent -> white background
        (lambda: Image.new("LA", (8, 8), (10, 255)), (10, 10, 10)),
        (lambda: Image.new("RGBA", (8, 8), (0, 0, 200, 255)), (0, 0, 200)),
        (lambda: Image.new("P", (8, 8), 0), (0, 0, 0)),
    ],
)
def test_modes_convert_to_rgb_through_png_or_jpeg(make, expected):
    img = make()
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if img.mode == "CMYK" else "PNG")
    out, notes = decode_image(buf.getvalue())
    assert out.mode == "RGB"
    assert notes == [f"converted {img.mode} to RGB"]
    pixel = tuple(int(v) for v in np.asarray(out)[4, 4])
    assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= 3


def test_palette_png_with_transparency_composites_on_white():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=1)
    out, _ = decode_image(buf.getvalue())
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I", "TIFF")])
def test_sixteen_bit_images_scaled_to_eight_bits(mode, fmt):
    arr = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    img = Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr.astype(np.int32))
    assert img.mode == mode
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out, notes = decode_image(buf.getvalue())
    assert np.asarray(out)[:, :, 0].tolist() == [[0, 100], [255, 200]]
    assert notes[0].startswith("converted I")


def test_float_mode_converts():
    out, note = to_rgb(Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)))
    assert np.asarray(out)[:, :, 1].tolist() == [[0, 128], [255, 64]] and note == "converted F to RGB"


def test_exif_orientation_is_applied():
    # a 40x20 image whose top-left quarter is red, stored with "rotate 90 CW to view" (orientation 6)
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out, notes = decode_image(buf.getvalue())
    assert out.size == (20, 40) and notes == ["EXIF orientation applied"]
    # after a 90-degree clockwise turn the red corner sits at the top right
    assert np.asarray(out)[5, 15, 0] > 200 and np.asarray(out)[5, 2, 0] < 60


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_never_crash(data):
    try:
        img, _ = decode_image(data, max_pixels=1 << 20)
    except DataError as err:
        assert err.reason in {
            R.EMPTY_IMAGE,
            R.NOT_AN_IMAGE,
            R.TRUNCATED_IMAGE,
            R.CORRUPT_IMAGE,
            R.IMAGE_TOO_LARGE,
            R.UNSUPPORTED_MODE,
        }
    else:
        assert img.mode == "RGB"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_damaged_real_image_bytes_never_crash(data):
    good = _jpeg_bytes((16, 16)) if data.draw(st.booleans()) else _png_bytes()
    cut = data.draw(st.integers(0, len(good)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=8))
    damaged = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for pos, value in flips:
        if pos < len(damaged):
            damaged[pos] = value
    try:
        img, _ = decode_image(bytes(damaged), max_pixels=1 << 20)
        assert img.mode == "RGB"
    except DataError:
        pass


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_postscript_behind_an_image_name_never_reaches_ghostscript(tmp_path, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(subprocess, "check_output", lambda *a, **k: calls.append(a) or b"10.0")
    path = tmp_path / "eps.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto showpage\n")
    with pytest.raises(DataError) as err:
        decode_image(path)
    assert err.value.reason == R.NOT_AN_IMAGE and not calls


def test_fifos_and_oversized_files_are_refused_without_reading(tmp_path, monkeypatch):
    import os

    from mlm.data import images

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "link.png").symlink_to(fifo)
    for path in (fifo, tmp_path / "link.png"):  # opening either would block forever
        with pytest.raises(DataError, match="not a regular file"):
            decode_image(path)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(2048)  # sparse: nothing is written
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1024)
    with pytest.raises(DataError) as err:
        decode_image(big)
    assert err.value.reason == R.IMAGE_TOO_LARGE and "2,048 bytes > max 1,024" in str(err.value)
