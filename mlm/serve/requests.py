"""What each ``mlm serve`` endpoint accepts: field checks that name the field, before a request reaches the model.

A request body is JSON (images as base64 strings) or a multipart form (images as file parts, other fields as form
values, which are converted to their JSON types). :func:`check_request` turns either into one checked dict or
raises :class:`BadRequest` with the field and what is wrong; decoding the image itself happens in the worker, where
a file that is not an image fails its own request only.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from typing import Any

from mlm.data.text import check_text

MAX_QUESTION_CHARS = 500
MAX_ITEMS = 64  # images or texts in one /v1/embed request
MAX_NEW_TOKENS = 64
MAX_BEAMS = 8
MAX_K = 100


class BadRequest(ValueError):
    """A request the service refuses: ``status`` (400, 404, 413, 422), the field and a reason."""

    def __init__(self, field: str, reason: str, status: int = 422):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": self.reason, "field": self.field}


def _image(value: Any, field: str) -> str:
    """A base64 image string, checked to decode to non-empty bytes (the pixels are checked in the worker)."""
    if isinstance(value, (bytes, bytearray)):
        value = base64.b64encode(value).decode("ascii")
    if not isinstance(value, str) or not value:
        raise BadRequest(field, "expected an image: a base64 string in JSON or a file in a multipart form")
    if value.startswith("data:"):  # a data URL: data:image/png;base64,<data>
        value = value.split(",", 1)[-1]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(field, "not valid base64") from None
    if not raw:
        raise BadRequest(field, "the image is empty")
    return value


def _number(value, kind: type):
    """A JSON number, or a form value's text read as one (None when it is neither)."""
    if isinstance(value, str) and len(value) <= 40:  # a multipart form value
        try:
            value = kind(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        return None
    return value


def _int(body: dict, field: str, default: int, low: int, high: int) -> int:
    value = _number(body.get(field, default), int)
    if value is None or not low <= value <= high:
        raise BadRequest(field, f"expected an integer from {low} to {high}, got {_shown(body.get(field))}")
    return value


def _float(body: dict, field: str, default: float, low: float, high: float) -> float:
    value = _number(body.get(field, default), float)
    if value is None or not low <= value <= high:  # NaN fails both comparisons
        raise BadRequest(field, f"expected a number from {low:g} to {high:g}, got {_shown(body.get(field))}")
    return float(value)


def _shown(value) -> str:
    return "a file" if isinstance(value, (bytes, bytearray)) else repr(value)[:40]


def _text(body: dict, field: str, max_chars: int) -> str:
    if field not in body:
        raise BadRequest(field, "missing")
    return _checked_text(body[field], field, max_chars)


def _checked_text(value, field: str, max_chars: int) -> str:
    """check_text, and no control or format characters (other than tab and newline) that no question holds."""
    try:
        text = check_text(value, field, max_chars)
    except ValueError as err:
        raise BadRequest(field, str(err).split(": ", 1)[-1]) from None
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n"), None)
    if bad is not None:
        raise BadRequest(field, f"holds the control character U+{ord(bad):04X}")
    return text


def _decoding(body: dict) -> dict:
    beams = _int(body, "num_beams", 1, 1, MAX_BEAMS)
    top_p = _float(body, "top_p", 0.0, 0.0, 1.0)
    if beams > 1 and top_p > 0:
        raise BadRequest("top_p", "choose beam search (num_beams > 1) or nucleus sampling (top_p > 0), not both")
    return {"num_beams": beams, "top_p": top_p, "max_new_tokens": _int(body, "max_new_tokens", 20, 1, MAX_NEW_TOKENS),
            "seed": _int(body, "seed", 0, 0, 2**31 - 1)}  # fmt: skip


def _list(body: dict, field: str) -> list:
    value = body.get(field, [])
    if isinstance(value, (str, bytes)):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise BadRequest(field, f"expected a list of at most {MAX_ITEMS} items")
    return value


def check_caption(body: dict) -> dict:
    """``{"image", "num_beams", "top_p", "max_new_tokens", "seed"}``."""
    if "image" not in body:
        raise BadRequest("image", "missing")
    return {"image": _image(body["image"], "image"), **_decoding(body)}


def check_answer(body: dict) -> dict:
    """``{"image", "question", ...decoding}``."""
    checked = check_caption(body)
    checked["question"] = _text(body, "question", MAX_QUESTION_CHARS)
    return checked


def check_embed(body: dict) -> dict:
    """``{"images": [...], "texts": [...]}``, at least one item in all."""
    images = [_image(v, f"images[{i}]") for i, v in enumerate(_list(body, "images"))]
    texts = []
    for i, text in enumerate(_list(body, "texts")):
        texts.append(_checked_text(text, f"texts[{i}]", MAX_QUESTION_CHARS))
    if not images and not texts:
        raise BadRequest("images", "give images and/or texts to embed")
    return {"images": images, "texts": texts}


def check_search(body: dict) -> dict:
    """``{"text", "k"}``."""
    return {"text": _text(body, "text", MAX_QUESTION_CHARS), "k": _int(body, "k", 5, 1, MAX_K)}


CHECKS = {"/v1/caption": check_caption, "/v1/answer": check_answer, "/v1/embed": check_embed,
          "/v1/search": check_search}  # fmt: skip
KNOWN_FIELDS = {"/v1/caption": {"image", "num_beams", "top_p", "max_new_tokens", "seed"},
                "/v1/answer": {"image", "question", "num_beams", "top_p", "max_new_tokens", "seed"},
                "/v1/embed": {"images", "texts"}, "/v1/search": {"text", "k"}}  # fmt: skip


def check_request(path: str, body: Any) -> dict:
    """The checked request of an endpoint; BadRequest naming the field otherwise (unknown fields are refused)."""
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS[path])
    if unknown:
        raise BadRequest(unknown[0], f"unknown field; this endpoint takes {', '.join(sorted(KNOWN_FIELDS[path]))}")
    return CHECKS[path](body)
