"""Evaluation reports: metrics.json, a Markdown table (report.md) and figures (matplotlib, Agg backend).

Figures: a retrieval query grid (each query with its top-K results, hits outlined in green) for both directions,
and a bar chart of VQA accuracy per answer type and per question type.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_array(image: Any) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1] from a PIL image, an (H, W[, 3]) array or a (3, H, W) tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = (image.permute(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3) else image).numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1):
        array = np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {array.shape}")
    return np.clip(array[..., :3], 0.0, 1.0)


def _mark(ax, hit: bool) -> None:
    """Outline an axis green for a correct result, grey otherwise."""
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("tab:green" if hit else "lightgrey")
        spine.set_linewidth(4 if hit else 1)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_text_to_image_grid(
    queries: Sequence[str], images: Sequence[Any], topk: torch.Tensor, targets: Sequence[int], path: str | Path
) -> Path:
    """One row per caption query: the query, then its top-K images; the query's own image outlined in green."""
    plt = _pyplot()
    n_rows, k = topk.shape
    fig, axes = plt.subplots(n_rows, k + 1, figsize=(2 * (k + 1), 2 * n_rows), squeeze=False)
    for row in range(n_rows):
        axes[row, 0].axis("off")
        axes[row, 0].text(0, 0.5, textwrap.fill(queries[row], 28), va="center", fontsize=8)
        for col, idx in enumerate(topk[row].tolist()):
            axes[row, col + 1].imshow(_as_array(images[idx]))
            _mark(axes[row, col + 1], idx == int(targets[row]))
    return _save(fig, plt, path)


def plot_image_to_text_grid(
    query_images: Sequence[Any], captions: Sequence[str], topk: torch.Tensor, hits: torch.Tensor, path: str | Path
) -> Path:
    """One row per image query: the image, then its top-K captions; ``hits`` (Q, K) marks correct ones in green."""
    plt = _pyplot()
    n_rows, k = topk.shape
    fig, axes = plt.subplots(n_rows, 2, figsize=(10, 2.2 * n_rows), squeeze=False, width_ratios=[1, 4])
    for row in range(n_rows):
        axes[row, 0].imshow(_as_array(query_images[row]))
        _mark(axes[row, 0], False)
        ax = axes[row, 1]
        ax.axis("off")
        for col, idx in enumerate(topk[row].tolist()):
            hit = bool(hits[row, col])
            caption = textwrap.shorten(captions[idx], 90, placeholder=" ...")
            text = f"{col + 1}. {'✓' if hit else '✗'} {caption}"
            ax.text(0, 1 - (col + 0.5) / k, text, va="center", fontsize=8, color="tab:green" if hit else "black")
    return _save(fig, plt, path)


def plot_vqa_types(metrics: Mapping[str, Any], path: str | Path, max_question_types: int = 25) -> Path:
    """Bar charts of VQA accuracy per answer type and per question type (lowest ``max_question_types`` shown)."""
    plt = _pyplot()
    answer_types = dict(metrics.get("per_answer_type", {}))
    all_question_types = sorted(metrics.get("per_question_type", {}).items(), key=lambda item: item[1])
    question_types = dict(all_question_types[:max_question_types])
    shown = ""
    if len(all_question_types) > len(question_types):
        shown = f" (lowest {len(question_types)} of {len(all_question_types)})"
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, max(3.0, 0.3 * len(question_types))), width_ratios=[1, 3], squeeze=True
    )
    panels = ((left, answer_types, "answer type"), (right, question_types, f"question type{shown}"))
    for ax, values, title in panels:
        ax.barh(list(values), list(values.values()), color="tab:blue")
        ax.set_xlim(0, 100)
        ax.set_xlabel("VQA accuracy (%)")
        ax.set_title(f"per {title}" if values else f"per {title}: not in the annotations")
        ax.tick_params(axis="y", labelsize=7)
    overall = metrics.get("overall")
    if overall is not None:
        fig.suptitle(f"VQAv2 accuracy {overall:.2f}% over {metrics.get('num_questions', '?')} questions")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    """Save a figure as PNG (creating the folder) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    if "caption" in results:
        c = results["caption"]
        names = [n for n in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if n in c]
        values = _fmt(*(c[n] for n in names))
        rows.append(f"| captioning ({c['num_images']} images) | {' / '.join(names)} | {values} |")
    return "\n".join(rows) + "\n"
