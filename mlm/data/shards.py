"""Shard lists from a pattern: brace ranges and lists ("shard-{000..009}.tar", "{a,b}.tar"), globs, or a folder.

A brace pattern is counted before it is expanded, so a pattern naming billions of files is refused at once instead
of filling memory.
"""

from __future__ import annotations

import glob
import math
import re
from pathlib import Path

MAX_SHARDS = 100_000  # a brace pattern naming more shards than this is refused before it is expanded


def _brace_count(spec: str) -> int:
    """How many names a brace pattern expands to, computed without expanding it."""
    counts = [re.fullmatch(r"(\d+)\.\.(\d+)", body) or body for body in re.findall(r"\{([^{}]*)\}", spec)]
    return math.prod(max(0, int(c.group(2)) - int(c.group(1)) + 1) if isinstance(c, re.Match) else len(c.split(","))
                     for c in counts)  # fmt: skip


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a brace pattern ("shard-{000..009}.tar", "{a,b}.tar"), a glob, or a folder of .tar."""
    match = re.search(r"\{([^{}]*)\}", spec)
    if match:
        count = _brace_count(spec)
        if count > MAX_SHARDS:
            raise ValueError(f"{spec}: the brace pattern names {count:,} shards; the limit is {MAX_SHARDS:,}")
        body = match.group(1)
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            lo, hi = numeric.groups()
            options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            options = body.split(",")
        return [p for o in options for p in expand_shards(spec[: match.start()] + o + spec[match.end() :])]
    if Path(spec).is_dir():
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]
