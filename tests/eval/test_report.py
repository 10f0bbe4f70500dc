"""Reports: metrics.json round trip, the Markdown table, and the figures (real PNG files)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mlm.eval.plots import plot_image_to_text_grid, plot_text_to_image_grid, plot_vqa_types
from mlm.eval.report import flatten_metrics, markdown_table, write_report

METRICS = {
    "overall": 62.5,
    "per_answer_type": {"yes/no": 50.0, "number": 75.0},
    "per_question_type": {"how many": 75.0, "is the": 50.0},
    "num_questions": 4,
    "METEOR": None,
    "missing": ["METEOR"],
}


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flatten_and_markdown_table():
    flat = flatten_metrics(METRICS)
    assert flat["per_answer_type/yes/no"] == 50.0 and flat["per_question_type/how many"] == 75.0
    table = markdown_table(METRICS)
    assert "| per_answer_type/yes/no | 50.00 |" in table
    assert "| METEOR | n/a (missing) |" in table  # missing, never shown as 0
    assert "| num_questions | 4 |" in table and "| missing | METEOR |" in table


def test_write_report_round_trips_json_and_links_figures(tmp_path):
    figure = plot_vqa_types(METRICS, tmp_path / "out" / "vqa_types.png")
    paths = write_report(METRICS, tmp_path / "out", "VQA on the sample", figures={"per type": figure})
    assert json.loads(paths["json"].read_text()) == METRICS
    report = paths["markdown"].read_text()
    assert report.startswith("# VQA on the sample\n") and "![per type](vqa_types.png)" in report
    assert _is_png(figure)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        write_report({"bad": object()}, tmp_path / "bad", "x")


def test_retrieval_grids_are_written(tmp_path):
    images = [
        Image.new("RGB", (16, 16), (200, 30, 30)),  # PIL image
        np.zeros((16, 16, 3), dtype=np.uint8),  # uint8 array
        torch.rand(3, 16, 16),  # CHW tensor in [0, 1]
    ]
    topk = torch.tensor([[0, 2, 1], [1, 0, 2]])
    t2i = plot_text_to_image_grid(["a red square", "a black square"], images, topk, [0, 1], tmp_path / "t2i.png")
    hits = torch.tensor([[True, False, False], [False, False, True]])
    captions = ["red", "black", "noise " * 40]
    i2t = plot_image_to_text_grid(images[:2], captions, topk, hits, tmp_path / "i2t.png")
    assert _is_png(t2i) and _is_png(i2t)
    with pytest.raises(ValueError, match=r"expected an RGB image"):
        plot_text_to_image_grid(["q"], [np.zeros((2, 2, 5))], torch.tensor([[0]]), [0], tmp_path / "bad.png")
