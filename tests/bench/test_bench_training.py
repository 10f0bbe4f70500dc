"""Smoke tests of the training benches at tiny sizes: the JSON keys they promise (no timing asserts)."""

import json
import subprocess
import sys

import pytest
from tiny_checkpoint import TINY_MODEL  # noqa: E402

from mlm.cli import main

TINY = [f"--set={s}" for s in TINY_MODEL]


@pytest.mark.parametrize("name", ["train", "ablate", "quality", "probe", "comm", "compress"])
def test_add_arguments_imports_no_torch(name):
    code = f"import sys, argparse, mlm.bench.{name} as m; m.add_arguments(argparse.ArgumentParser()); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_train_compares_ours_with_open_clip_coca(tmp_path, capsys):
    from open_clip.coca_model import CoCa

    import mlm.bench.coca as peer

    out = tmp_path / "train.json"
    argv = ["bench", "train", *TINY, "--batch-size", "8", "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    for name in ("ours", "coca"):
        assert set(report[name]) >= {"samples_per_s", "step_s", "flops_per_sample", "params", "peak_share"}
        assert report[name]["flops_per_sample"] > 0
    assert report["ratio"] == pytest.approx(report["ours"]["samples_per_s"] / report["coca"]["samples_per_s"], 1e-2)
    assert "open_clip CoCa" in capsys.readouterr().out
    assert peer.build_coca.__module__ == "mlm.bench.coca" and CoCa.__module__ == "open_clip.coca_model"


def test_bench_ablate_quick_rows_and_deltas(tmp_path):
    out = tmp_path / "ablate.json"
    names = ["baseline", "mean-pool", "no-fusion", "no-pos-keys", "one-turn", "words-pooled", "no-words", "null",
             "no-pos-values", "no-overlap", "compact-prompt", "no-grounding", "linear-patches"]  # fmt: skip
    argv = ["bench", "ablate", "--quick", "--budget-s", "1", "--rows", ",".join(names), "--row", "mine=train.lr=1e-3",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == [*names, "mine"]
    for row in rows.values():
        assert set(row) >= {"t2i_R@1", "i2t_R@1", "vqa", "shape", "position", "params", "step_s", "steps"}
    assert rows["no-fusion"]["steps"] == rows["baseline"]["steps"]  # an evaluation switch re-scores the baseline
    assert rows["mean-pool"]["params"] < rows["baseline"]["params"]  # no per-level scorers
    # one position projection per decoder layer: dim (32) x qk_rope_head_dim (4) in the quick model's 1 layer
    assert rows["baseline"]["params"] - rows["no-pos-keys"]["params"] == 32 * 4
    assert rows["words-pooled"]["params"] == rows["no-grounding"]["params"]  # the same head, on the pooled image
    assert rows["no-grounding"]["params"] < rows["baseline"]["params"]
    assert rows["no-words"]["params"] < rows["baseline"]["params"]  # no word head
    assert rows["null"]["params"] - rows["baseline"]["params"] == 32  # one null token of width 32
    assert rows["baseline"]["params"] - rows["no-pos-values"]["params"] == 32 * 32  # the position projection
    # the shipped stem takes the quick model's 8 px patch down to a 2 px projection, which the 1-pixel overlap
    # widens to 4 px: the stem's 32 channels in, 32 out
    assert rows["baseline"]["params"] - rows["no-overlap"]["params"] == (4 * 4 - 2 * 2) * 32 * 32
    assert rows["compact-prompt"]["params"] == rows["baseline"]["params"]  # a data format, no weights
    assert main(["bench", "ablate", "--quick", "--rows", "nonsense"]) == 2


def test_bench_quality_quick_scores_both_models(tmp_path):
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--quick", "--budget-s", "2", "--split", "val", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["ours"]) >= {"t2i_R@1", "i2t_R@1", "CIDEr", "vqa", "per_question_type"}
    assert set(report["coca"]) >= {"t2i_R@1", "i2t_R@1", "CIDEr"} and "vqa" not in report["coca"]
    assert report["ours"]["steps"] >= 2 and report["coca"]["steps"] >= 1


@pytest.mark.slow
def test_bench_serve_quick_writes_the_keys(tiny_run, tmp_path):
    run, synth = tiny_run
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--quick", "--checkpoint", str(run), "--images", str(synth / "images")]
    argv += ["--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {"caption_throughput_ratio", "caption_p99_over_single", "mixed", "rows"} <= set(report)
    assert {r["batching"] for r in report["rows"]} == {"on", "off"} and report["mixed"]["failed_good"] == 0
    assert all(set(r) >= {"throughput_rps", "p50_ms", "p95_ms", "p99_ms", "failed"} for r in report["rows"])


def test_bench_comm_refuses_bad_rows_before_training(capsys):
    assert main(["bench", "comm", "--quick", "--modes", "int2"]) == 2
    assert "--modes int2: rows are none, fp16, bf16, int8, int4, int4-no-ef, powersgd" in capsys.readouterr().err
    assert main(["bench", "comm", "--quick", "--processes", "1"]) == 2


@pytest.mark.slow
def test_bench_comm_quick_runs_two_processes_per_mode(tmp_path):
    out = tmp_path / "comm.json"
    assert main(["bench", "comm", "--quick", "--modes", "none,int4-no-ef,int4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["none", "int4-no-ef", "int4"]
    for row in rows.values():
        assert set(row) >= {
            "bytes_per_step",
            "bytes_ratio",
            "step_s",
            "samples_per_s",
            "loss",
            "loss_gap_pct",
            "heldout_loss",
            "heldout_gap_pct",
            "drift",
        }
        assert row["processes"] == 2 and row["steps"] == 4
    assert rows["none"]["drift"] is None and rows["int4"]["drift"] < rows["int4-no-ef"]["drift"]
    assert rows["none"]["bytes_ratio"] == 1.0 and rows["none"]["loss_gap_pct"] == 0.0
    assert rows["none"]["heldout_gap_pct"] == 0.0 and rows["int4"]["heldout_loss"] != rows["none"]["heldout_loss"]
    assert rows["int4"]["bytes_ratio"] < 1 / 7 and rows["int4"]["loss"] != rows["none"]["loss"]
