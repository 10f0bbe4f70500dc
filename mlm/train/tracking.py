"""Run logs: a CSV tracker for accelerate, the end-of-run ``summary.json``, the loss/lr curve PNG and memory peaks.

TensorBoard comes from accelerate's own tracker; :class:`CSVTracker` adds a plain ``metrics.csv`` (long format:
``step,name,value``) that needs no viewer, survives resumes (it appends) and feeds the curve plot.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import resource
import sys
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker, on_main_process

logger = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"
CURVES_PNG = "curves.png"


class CSVTracker(GeneralTracker):
    """accelerate tracker appending ``step,name,value`` rows to ``<logging_dir>/metrics.csv``."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_CSV
        self._file = None
        self._writer = None

    @on_main_process
    def start(self) -> None:
        """Open the file for appending (a resumed run continues the same file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["step", "name", "value"])

    @property
    def tracker(self):
        """The path of the CSV file."""
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        """The config lives in config.yaml beside the CSV; nothing to add here."""

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        """Append one row per numeric value."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.writerow([step, key, f"{value:.6g}"])
        self._file.flush()

    @on_main_process
    def finish(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series per metric name from a metrics.csv, sorted by step; a step logged twice (a resumed stretch) keeps
    its last value."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            series[row["name"]][int(row["step"])] = float(row["value"])
    return {name: sorted(points.items()) for name, points in series.items()}


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """Draw losses (log scale) and the learning rate against the step; return the PNG path (None: no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    losses = {k: v for k, v in series.items() if k.startswith("loss")}
    if not losses:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    for name, points in sorted(losses.items()):
        kept = [(s, v) for s, v in points if math.isfinite(v) and v > 0]  # log scale: zeros (absent parts) left out
        if kept:
            ax_loss.plot(*zip(*kept, strict=True), label=name)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if "lr" in series:
        ax_lr.plot(*zip(*series["lr"], strict=True), color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the accelerator memory peak from now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated (when on CUDA) and peak resident memory of this process, in MiB."""
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    out = {"peak_rss_mb": round(rss, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def write_summary(path: str | Path, summary: dict) -> Path:
    """Write the end-of-run summary as indented JSON."""
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path
