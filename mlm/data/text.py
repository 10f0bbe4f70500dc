"""Checks on text a user types (questions, search texts, captions to explain) before it reaches the tokenizer.

Command-line arguments that are not valid UTF-8 arrive in Python as lone surrogates (PEP 383), which the tokenizer
cannot encode; empty or very long texts would be answered or cut without a word. Each case gets one message that
names the text and says what is allowed.
"""

from __future__ import annotations

MAX_TEXT_CHARS = 2000  # far above any question or caption a model of this size reads (max_text_len tokens)


def check_text(text: object, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The text without surrounding whitespace; ValueError naming ``what`` when it is not a non-empty, valid UTF-8
    string of at most max_chars characters."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise ValueError(f"{what}: not valid UTF-8 text ({byte} at character {err.start})") from None
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{what}: the text is empty")
    if len(stripped) > max_chars:
        raise ValueError(f"{what}: {len(stripped):,} characters; the limit is {max_chars:,}")
    return stripped
