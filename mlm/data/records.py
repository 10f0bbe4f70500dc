"""The one record shape every data source yields, the error a bad record raises, and the skip counter.

A :class:`Record` holds an image reference (a file path or encoded bytes, decoded only on access), its captions
and, for VQA, one question with its answers. Sources never crash on bad input: each problem is either raised as a
:class:`DataError` naming the file and line/field (``strict`` mode, or a whole file that cannot be read) or
counted in :class:`SkipStats` under a short reason with a few example messages (lenient mode, the default).

Text as every reader gets it: ``read_text`` reads an annotation file keeping undecodable bytes (as surrogates), and
``clean_text`` turns one field into a one-line caption, question or answer, or counts why it cannot be one.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 1000  # longer captions are cut at a word boundary and counted as "caption truncated"

# Reasons, so that counts from different sources line up in one table.
MISSING_IMAGE = "missing image"
EMPTY_IMAGE = "empty image file"
TRUNCATED_IMAGE = "truncated image"
NOT_AN_IMAGE = "not an image"
CORRUPT_IMAGE = "corrupt image"
IMAGE_TOO_LARGE = "image too large"
EXTREME_ASPECT = "extreme aspect ratio"
UNSUPPORTED_MODE = "unsupported image mode"
EMPTY_CAPTION = "empty caption"
NON_UTF8 = "non-UTF-8 text"
MALFORMED_JSON = "malformed JSON"
MALFORMED_LINE = "malformed line"
WRONG_SCHEMA = "wrong schema"
NO_CAPTION = "no valid caption"
NO_ANSWER = "no valid answer"
DUPLICATE_ID = "duplicate id"
EMPTY_FILE = "empty file"
TRUNCATED_FILE = "truncated file"
CAPTION_TRUNCATED = "caption truncated"

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"\s+")


class DataError(ValueError):
    """A bad record or file: ``reason`` is one of the reason constants, ``origin`` is "file:line" or "file:key"."""

    def __init__(self, reason: str, origin: str, detail: str = ""):
        self.reason = reason
        self.origin = origin
        self.detail = detail
        super().__init__(f"{origin}: {reason}" + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class FileSlice:
    """``size`` bytes at ``offset`` inside ``path``: an image stored in an archive (webdataset tar member)."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The bytes of the slice."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Record:
    """One image with its captions and, for VQA records, one question and its answers."""

    image: str | bytes | FileSlice | None  # a file path, encoded bytes (parquet), a tar member; None: absent
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    answer: str | None = None  # canonical answer (VQAv2 multiple_choice_answer); default: most common of answers
    image_id: int | str | None = None
    question_id: int | str | None = None
    question_type: str | None = None
    answer_type: str | None = None
    origin: str = ""  # "file:line" or "file:key", for messages

    def __post_init__(self):
        if self.question is not None and self.answer is None and self.answers:
            self.answer = Counter(self.answers).most_common(1)[0][0]

    @property
    def is_vqa(self) -> bool:
        """True for a question/answer record."""
        return self.question is not None

    @property
    def image_name(self) -> str:
        """A short name for the image: the file path, or "<N bytes>" for embedded images."""
        if self.image is None:
            return "<no image>"
        if isinstance(self.image, FileSlice):
            return f"{self.image.path}@{self.image.offset}"
        return str(self.image) if isinstance(self.image, (str, Path)) else f"<{len(self.image)} bytes>"


@dataclass
class SkipStats:
    """Counts records read and skipped per reason, parts dropped, and repairs; raises in strict mode."""

    strict: bool = False
    max_examples: int = 3
    read: int = 0
    skipped: Counter = field(default_factory=Counter)  # whole records left out
    dropped: Counter = field(default_factory=Counter)  # a caption/answer left out, the record kept
    fixed: Counter = field(default_factory=Counter)  # repaired in place (truncated, converted to RGB, rotated)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        """Records read and not skipped."""
        return self.read - sum(self.skipped.values())

    def _note(self, counter: Counter, kind: str, reason: str, origin: str, detail: str) -> None:
        counter[reason] += 1
        message = f"{origin}: {reason}" + (f": {detail}" if detail else "")
        shown = self.examples.setdefault(f"{kind}:{reason}", [])
        if len(shown) < self.max_examples:
            shown.append(message)
        logger.debug("%s %s", kind, message)

    def skip(self, reason: str, origin: str, detail: str = "") -> None:
        """Count a record left out (or raise DataError in strict mode)."""
        if self.strict:
            raise DataError(reason, origin, detail)
        self._note(self.skipped, "skipped", reason, origin, detail)

    def drop(self, reason: str, origin: str, detail: str = "") -> None:
        """Count a caption or answer left out of a record that may still be kept (raises in strict mode)."""
        if self.strict:
            raise DataError(reason, origin, detail)
        self._note(self.dropped, "dropped", reason, origin, detail)

    def fix(self, reason: str, origin: str, detail: str = "") -> None:
        """Count a repair made in place; never raises, even in strict mode."""
        self._note(self.fixed, "fixed", reason, origin, detail)

    def skip_error(self, err: DataError) -> None:
        """Count a DataError as a skipped record (re-raise it in strict mode)."""
        if self.strict:
            raise err
        self._note(self.skipped, "skipped", err.reason, err.origin, err.detail)

    def merge(self, other: SkipStats) -> None:
        """Add another counter's numbers and examples into this one."""
        self.read += other.read
        self.skipped.update(other.skipped)
        self.dropped.update(other.dropped)
        self.fixed.update(other.fixed)
        for key, messages in other.examples.items():
            shown = self.examples.setdefault(key, [])
            shown.extend(messages[: max(0, self.max_examples - len(shown))])

    def to_dict(self) -> dict:
        """Plain-dict summary for JSON."""
        return {
            "read": self.read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "fixed": dict(self.fixed),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def table(self, title: str = "") -> str:
        """A readable table: records read and kept, then one row per reason with example messages."""
        lines = [title] if title else []
        lines.append(f"  {'records read':<40} {self.read:>8}")
        lines.append(f"  {'records kept':<40} {self.kept:>8}")
        for kind, counter in (("skipped", self.skipped), ("dropped", self.dropped), ("fixed", self.fixed)):
            for reason, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {kind + ': ' + reason:<40} {count:>8}")
                lines.extend(f"      e.g. {m}" for m in self.examples.get(f"{kind}:{reason}", []))
        return "\n".join(lines)


def clean_text(
    value: object, origin: str, stats: SkipStats, what: str = "caption", max_chars: int = MAX_CAPTION_CHARS
) -> str | None:
    """Return value as one-line text, or None after counting why it was dropped (empty, not text, not UTF-8).

    Text longer than ``max_chars`` is cut at a word boundary and counted as "caption truncated".
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            stats.drop(NON_UTF8, origin, f"{what} bytes {value[max(0, err.start - 8) : err.end + 8]!r}")
            return None
    if not isinstance(value, str):
        stats.drop(WRONG_SCHEMA, origin, f"{what} should be text, got {type(value).__name__} {str(value)[:60]!r}")
        return None
    bad = _SURROGATE.search(value)
    if bad:
        # surrogateescape'd undecodable bytes, or lone surrogates escaped in JSON: not valid UTF-8 text
        snippet = value[max(0, bad.start() - 20) : bad.end() + 20]
        try:
            shown = repr(snippet.encode("utf-8", errors="surrogateescape"))  # the raw bytes as in the file
        except UnicodeEncodeError:
            shown = repr(snippet)
        stats.drop(NON_UTF8, origin, f"{what} {shown}")
        return None
    text = _SPACES.sub(" ", value).strip()
    if not text:
        stats.drop(EMPTY_CAPTION if what == "caption" else f"empty {what}", origin, f"{value!r}")
        return None
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        stats.fix(CAPTION_TRUNCATED, origin, f"{len(text)} characters > {max_chars}")
        text = text[: cut if cut > 0 else max_chars]
    return text


def read_text(path: Path) -> str:
    """File text as UTF-8 (BOM stripped); undecodable bytes are kept as surrogates so fields can be checked."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(EMPTY_FILE, str(path), f"{len(data)} bytes, no content")
    return data.decode("utf-8-sig", errors="surrogateescape")
