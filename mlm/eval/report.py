"""Evaluation reports: metrics.json, a Markdown table of the metrics (report.md) and the summary table commands print.

Figures are drawn by :mod:`mlm.eval.plots`; files of results are read by :mod:`mlm.eval.results_io`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts as one level with ``/``-joined names (``per_answer_type/yes/no``)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    """One Markdown table cell: 2 decimals for floats, 'n/a' for a missing metric."""
    if value is None:
        return "n/a (missing)"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return str(value).replace("|", "\\|")


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """A two-column ``| metric | value |`` Markdown table of the (flattened) metrics."""
    rows = ["| metric | value |", "| --- | ---: |"]
    rows += [f"| {name} | {_cell(value)} |" for name, value in flatten_metrics(metrics).items()]
    return "\n".join(rows) + "\n"


def write_report(
    metrics: Mapping[str, Any], out_dir: str | Path, title: str, figures: Mapping[str, str | Path] | None = None
) -> dict[str, Path]:
    """Write ``metrics.json`` and ``report.md`` (title, table, linked figures) into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "metrics.json"
    try:
        text = json.dumps(metrics, indent=2, allow_nan=True)
    except TypeError as err:
        raise ValueError(f"metrics must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from err
    json_path.write_text(text + "\n", encoding="utf-8")
    lines = [f"# {title}", "", markdown_table(metrics)]
    for caption, figure in (figures or {}).items():
        figure = Path(figure)
        link = figure.relative_to(out) if figure.is_relative_to(out) else figure
        lines += [f"![{caption}]({link.as_posix()})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return {"json": json_path, "markdown": md_path}


def _fmt(*values: Any) -> str:
    """Numbers joined by ' / ', 'n/a' for missing ones."""
    return " / ".join("n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in values)


def summary_table(results: dict[str, dict]) -> str:
    """A short Markdown table of the headline numbers of each task (the full table is in report.md)."""
    rows = ["| task | metric | value |", "| --- | --- | ---: |"]
    if "retrieval" in results:
        r = results["retrieval"]
        size = f"{r['num_images']} images, {r['num_texts']} captions"
        rows += [
            f"| retrieval ({size}) | image→text R@1 / R@5 / R@10 | "
            f"{_fmt(r['image_to_text_R@1'], r['image_to_text_R@5'], r['image_to_text_R@10'])} |",
            f"| | text→image R@1 / R@5 / R@10 | "
            f"{_fmt(r['text_to_image_R@1'], r['text_to_image_R@5'], r['text_to_image_R@10'])} |",
            f"| | mean recall | {_fmt(r['mean_recall'])} |",
            f"| | median rank image→text / text→image | "
            f"{_fmt(r['image_to_text_median_rank'], r['text_to_image_median_rank'])} |",
        ]
    if "vqa" in results:
        v = results["vqa"]
        rows.append(f"| VQA, {v['mode']} ({v['num_questions']} questions) | accuracy | {_fmt(v['overall'])} |")
        rows += [f"| | {name} | {_fmt(value)} |" for name, value in v["per_answer_type"].items()]
        if "shuffled_images" in v:  # each question about another image: what the image explains
            s = v["shuffled_images"]
            values = _fmt(s["overall"], s["image_gain"])
            rows.append(f"| VQA, shuffled images | accuracy (own image's gain) | {values} |")
            rows += [f"| | {name} | {_fmt(value, s['image_gain_per_answer_type'][name])} |"
                     for name, value in s["per_answer_type"].items()]  # fmt: skip
    if "caption" in results:
        c = results["caption"]
        names = [n for n in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if n in c]
        values = _fmt(*(c[n] for n in names))
        rows.append(f"| captioning ({c['num_images']} images) | {' / '.join(names)} | {values} |")
    return "\n".join(rows) + "\n"
