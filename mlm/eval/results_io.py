"""Reading evaluation inputs: JSON files and official results files, each bad file named with its line or entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path) -> Any:
    """Load a JSON file; a missing file or bad JSON raises an error that names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def is_id(value: Any) -> bool:
    """Whether a JSON value can be an image or question id (a number or a string, as in the official files)."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def read_results(path: str | Path, id_key: str, value_key: str) -> dict[Any, str]:
    """Read an official results file ``[{id_key: ..., value_key: "..."}]`` as {id: value}, one entry per id."""
    results = read_json(path)
    if not isinstance(results, list):
        kind = type(results).__name__
        raise ValueError(f"{path}: expected a JSON list of {{'{id_key}', '{value_key}'}} objects, got a {kind}")
    values: dict[Any, str] = {}
    for i, item in enumerate(results):
        if not isinstance(item, dict) or not is_id(item.get(id_key)) or not isinstance(item.get(value_key), str):
            shown = repr(item) if len(repr(item)) <= 200 else repr(item)[:197] + "..."
            raise ValueError(f"{path}: entry {i} must have a number or string '{id_key}' and a string "
                             f"'{value_key}', got {shown}")  # fmt: skip
        if item[id_key] in values:
            raise ValueError(f"{path}: entry {i} repeats {id_key} {item[id_key]!r} (one {value_key} per {id_key})")
        values[item[id_key]] = item[value_key]
    return values
