"""CSV tracker round trip (a resumed stretch overwrites its steps), the curve PNG and the summary file."""

import json

import torch

from mlm.train.tracking import CSVTracker, peak_memory_mb, plot_curves, read_metrics, write_summary


def test_csv_round_trip_keeps_the_last_value_of_a_repeated_step(tmp_path):
    tracker = CSVTracker("run", tmp_path)
    tracker.start()
    tracker.log({"loss": 2.0, "lr": 0.1, "note": "text is skipped"}, step=1)
    tracker.log({"loss": 1.5, "lr": 0.2}, step=2)
    tracker.finish()
    resumed = CSVTracker("run", tmp_path)  # a resumed run re-does step 2 and goes on
    resumed.start()
    resumed.log({"loss": 1.25, "lr": 0.2}, step=2)
    resumed.log({"loss": 1.0, "lr": 0.3}, step=3)
    resumed.finish()
    series = read_metrics(tmp_path / "metrics.csv")
    assert series == {"loss": [(1, 2.0), (2, 1.25), (3, 1.0)], "lr": [(1, 0.1), (2, 0.2), (3, 0.3)]}
    assert (tmp_path / "metrics.csv").read_text().count("step,name,value") == 1

    png = plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_and_memory(tmp_path):
    memory = peak_memory_mb(torch.device("cpu"))
    assert memory["peak_rss_mb"] > 10  # a Python process with torch loaded
    path = write_summary(tmp_path / "summary.json", {"steps": 3, **memory})
    assert json.loads(path.read_text())["steps"] == 3
