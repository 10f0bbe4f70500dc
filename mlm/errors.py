"""Library exceptions as one readable line, for messages that name a file and say what is wrong with it."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (its type name when it has none), cut to limit."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]
