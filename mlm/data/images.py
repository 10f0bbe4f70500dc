"""Safe image decoding: every file either becomes an RGB ``PIL.Image`` or raises a :class:`DataError` with a reason.

Handles what real photo folders contain: 0-byte files, truncated JPEGs, non-image bytes behind an image
extension, decompression bombs (checked from the header, before any pixel is decoded), EXIF-rotated photos
(orientation applied), and every PIL mode (CMYK, L, LA, P with transparency, 16-bit 'I;16'/'I', float 'F')
converted to 8-bit RGB, transparent pixels composited onto white.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlm.data.records import (
    CORRUPT_IMAGE,
    EMPTY_IMAGE,
    EXTREME_ASPECT,
    IMAGE_TOO_LARGE,
    MISSING_IMAGE,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNSUPPORTED_MODE,
    DataError,
    FileSlice,
)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default for Image.MAX_IMAGE_PIXELS
MAX_FILE_BYTES = 256 * 2**20  # an encoded image larger than this is refused before it is read
# Formats PIL decodes by itself. Others (EPS/PS through Ghostscript, and the rarer plugins) are refused whatever the
# file's name: EPS hands the file to an external interpreter.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "ICO", "TGA", "DIB", "AVIF")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
EXIF_ORIENTATION = 0x0112
MAX_ASPECT = 20  # longest side / shortest side
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image_bytes(image: str | Path | bytes | FileSlice | None, origin: str = "") -> bytes:
    """Return the encoded bytes of an image path, tar member or bytes; missing or 0-byte files raise."""
    if image is None:
        raise DataError(MISSING_IMAGE, origin or "<record>", "the record names no image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, FileSlice):
        try:
            data = image.read()
        except OSError as err:
            raise DataError(MISSING_IMAGE, origin or image.path, f"cannot read {image.path}: {err}") from err
        if len(data) < image.size:
            raise DataError(TRUNCATED_IMAGE, origin or image.path, f"{len(data)} of {image.size} bytes in archive")
    else:
        path = Path(image)
        try:
            _check_regular_file(path)
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise DataError(MISSING_IMAGE, origin or str(path), f"no such file: {path}") from err
        except IsADirectoryError as err:
            raise DataError(MISSING_IMAGE, origin or str(path), f"is a folder, not a file: {path}") from err
        except OSError as err:
            raise DataError(MISSING_IMAGE, origin or str(path), f"cannot read {path}: {err}") from err
    if not data:
        raise DataError(EMPTY_IMAGE, origin or str(image), "0 bytes")
    return data


def _check_regular_file(path: Path) -> None:
    """Refuse what would block or exhaust memory when read: FIFOs, devices, and files over MAX_FILE_BYTES."""
    import stat

    info = path.stat()  # follows links, so a link to a FIFO is refused too
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(info.st_mode):
        raise DataError(NOT_AN_IMAGE, str(path), "not a regular file (a FIFO, socket or device)")
    if info.st_size > MAX_FILE_BYTES:
        raise DataError(IMAGE_TOO_LARGE, str(path), f"{info.st_size:,} bytes > max {MAX_FILE_BYTES:,}")


def _available_formats() -> list[str]:
    """The safe formats this Pillow build can open (AVIF needs a plugin that not every build has)."""
    Image.init()
    return [name for name in SAFE_FORMATS if name in Image.OPEN]


def _open(data: bytes, max_pixels: int, origin: str) -> Image.Image:
    """Open (header only) and check the pixel count before decoding anything."""
    try:
        img = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as err:
        raise DataError(IMAGE_TOO_LARGE, origin, str(err)) from err
    except UnidentifiedImageError as err:
        raise DataError(NOT_AN_IMAGE, origin, f"{len(data)} bytes starting {data[:12]!r}") from err
    except Exception as err:  # noqa: BLE001 - PIL plugins raise many types on hostile headers
        raise DataError(_classify(err), origin, f"{type(err).__name__}: {err}") from err
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DataError(CORRUPT_IMAGE, origin, f"size {width}x{height}")
    if width * height > max_pixels:
        raise DataError(IMAGE_TOO_LARGE, origin, f"{width}x{height} = {width * height} pixels > max {max_pixels}")
    if max(width, height) > MAX_ASPECT * min(width, height):
        # resizing the short side to the model's size would make the long side enormous
        raise DataError(EXTREME_ASPECT, origin, f"{width}x{height} is more than {MAX_ASPECT}:1")
    return img


def _load(img: Image.Image, origin: str) -> None:
    """Decode the pixels, telling a truncated file from a corrupt one."""
    try:
        img.load()
    except Exception as err:  # noqa: BLE001 - decoders raise OSError/ValueError/SyntaxError/struct.error/...
        raise DataError(_classify(err), origin, f"{type(err).__name__}: {err}") from err


def _classify(err: Exception) -> str:
    """Tell a file that ends too early from one with broken content."""
    message = str(err).lower()
    truncated = isinstance(err, (OSError, EOFError)) and ("truncated" in message or "broken data stream" in message)
    return TRUNCATED_IMAGE if truncated else CORRUPT_IMAGE


def apply_exif_orientation(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Rotate/flip as the EXIF orientation tag says; returns the image and a note (None when unchanged)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF blocks must not lose the photo
        return img, "EXIF unreadable, orientation not applied"
    if orientation not in (2, 3, 4, 5, 6, 7, 8):  # 1 is upright; anything else is not a valid orientation
        return img, None
    try:
        return ImageOps.exif_transpose(img), "EXIF orientation applied"
    except Exception:  # noqa: BLE001
        return img, "EXIF unreadable, orientation not applied"


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """Scale a 16-bit grey image (modes 'I;16*', 'I') to 8-bit 'L'."""
    arr = np.asarray(img).astype(np.float64)  # (H, W)
    return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))


def _float_to_eight(img: Image.Image) -> Image.Image:
    """Map a float image to 8-bit: values in [0, 1] are scaled by 255, anything else is clipped to [0, 255]."""
    arr = np.nan_to_num(np.asarray(img).astype(np.float64))  # (H, W)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image, origin: str = "") -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; returns the image and a note naming the original mode (None if RGB)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    try:
        if mode in _SIXTEEN_BIT:
            out = _sixteen_to_eight(img).convert("RGB")
        elif mode == "F":
            out = _float_to_eight(img).convert("RGB")
        elif mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white, not black
        else:
            out = img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - e.g. LAB has no direct conversion
        raise DataError(UNSUPPORTED_MODE, origin, f"cannot convert mode {mode} to RGB: {err}") from err
    return out, f"converted {mode} to RGB"


def decode_image(
    image: str | Path | bytes | FileSlice | None, max_pixels: int = DEFAULT_MAX_PIXELS, origin: str = ""
) -> tuple[Image.Image, list[str]]:
    """Decode a path or bytes to an RGB image; returns it with notes on repairs made (EXIF rotation, mode).

    Raises DataError with one of the image reasons (missing, empty, not an image, truncated, corrupt, too large,
    unsupported mode) and ``origin`` in the message.
    """
    origin = origin or (str(image) if isinstance(image, (str, Path)) else "<bytes>")
    data = read_image_bytes(image, origin)
    with warnings.catch_warnings():
        # our own pixel check replaces PIL's warning; EXIF/metadata warnings do not make a photo unusable
        warnings.simplefilter("ignore")
        img = _open(data, max_pixels, origin)
        _load(img, origin)
        notes = []
        img, note = apply_exif_orientation(img)
        if note:
            notes.append(note)
        img, note = to_rgb(img, origin)
        if note:
            notes.append(note)
    return img, notes


def is_image_file(path: str | Path) -> bool:
    """True when the file name has a common image extension."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
