"""Evaluation figures (matplotlib, Agg backend): retrieval query grids, VQA accuracy per type, confusion matrices.

Every function draws one PNG and returns its path; :func:`pyplot` and :func:`save_figure` are the shared set-up
and tear-down the other figure code (captions, attention maps) uses too.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_array(image: Any) -> np.ndarray:
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
    plt = pyplot()
    n_rows, k = topk.shape
    fig, axes = plt.subplots(n_rows, k + 1, figsize=(2 * (k + 1), 2 * n_rows), squeeze=False)
    for row in range(n_rows):
        axes[row, 0].axis("off")
        axes[row, 0].text(0, 0.5, textwrap.fill(queries[row], 28), va="center", fontsize=8)
        for col, idx in enumerate(topk[row].tolist()):
            axes[row, col + 1].imshow(as_array(images[idx]))
            _mark(axes[row, col + 1], idx == int(targets[row]))
    return save_figure(fig, plt, path)


def plot_image_to_text_grid(
    query_images: Sequence[Any], captions: Sequence[str], topk: torch.Tensor, hits: torch.Tensor, path: str | Path
) -> Path:
    """One row per image query: the image, then its top-K captions; ``hits`` (Q, K) marks correct ones in green."""
    plt = pyplot()
    n_rows, k = topk.shape
    fig, axes = plt.subplots(n_rows, 2, figsize=(10, 2.2 * n_rows), squeeze=False, width_ratios=[1, 4])
    for row in range(n_rows):
        axes[row, 0].imshow(as_array(query_images[row]))
        _mark(axes[row, 0], False)
        ax = axes[row, 1]
        ax.axis("off")
        for col, idx in enumerate(topk[row].tolist()):
            hit = bool(hits[row, col])
            caption = textwrap.shorten(captions[idx], 90, placeholder=" ...")
            text = f"{col + 1}. {'✓' if hit else '✗'} {caption}"
            ax.text(0, 1 - (col + 0.5) / k, text, va="center", fontsize=8, color="tab:green" if hit else "black")
    return save_figure(fig, plt, path)


def plot_vqa_types(metrics: Mapping[str, Any], path: str | Path, max_question_types: int = 25) -> Path:
    """Bar charts of VQA accuracy per answer type and per question type (lowest ``max_question_types`` shown)."""
    plt = pyplot()
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
    return save_figure(fig, plt, path)


def save_figure(fig, plt, path: str | Path) -> Path:
    """Save a figure as PNG (creating the folder) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> Path:
    """A confusion-matrix heat map (rows: true class, columns: predicted), counts written in the cells."""
    plt = pyplot()
    n = len(classes)
    side = min(2.0 + 0.45 * n, 24.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), [c.replace("_", " ") for c in classes], rotation=90, fontsize=8)
    ax.set_yticks(range(n), [c.replace("_", " ") for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = max((max(row) for row in confusion), default=0)
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                if count:
                    colour = "white" if count > peak / 2 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=colour)
    return save_figure(fig, plt, path)
