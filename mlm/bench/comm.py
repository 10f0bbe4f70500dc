"""``mlm bench comm``: compressed DDP gradients, each mode a real 2-process ``accelerate launch`` run over gloo.

Every row trains the same config from the same seed for ``--steps`` steps with one ``train.grad_compression`` mode
(``int4-no-ef`` is int4 with ``train.grad_compression_error_feedback=false``; ``powersgd-warm`` starts PowerSGD
after the learning-rate warmup, ``train.grad_compression_start`` = ``train.warmup_steps``; ``powersgd-r8`` and
``powersgd-r16`` are PowerSGD at rank 8 and 16 instead of ``train.grad_compression_rank``) and reports the payload
bytes one process sent per step, against the fp32 gradient (4 bytes a parameter: what uncompressed DDP all-reduces), the
step time, the training loss after the last steps (the mean of the last logging interval) and the held-out
loss of the final model (the same objective on fixed batches of the data's val split, ``--heldout-batches`` of the
global batch size), each with its gap to ``none``, and the drift at the end (how far the sum of what one process sent
is from the sum of its true gradients, in units of its last gradient: bounded with error feedback, growing without;
``mlm.train.comm``). The held-out loss is the one to compare: the last training batches differ from run to run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "none": [],
    "fp16": ["train.grad_compression=fp16"],
    "bf16": ["train.grad_compression=bf16"],
    "int8": ["train.grad_compression=int8"],
    "int4": ["train.grad_compression=int4"],
    "int4-no-ef": ["train.grad_compression=int4", "train.grad_compression_error_feedback=false"],
    "powersgd": ["train.grad_compression=powersgd"],
    "powersgd-warm": ["train.grad_compression=powersgd", "train.grad_compression_start={warmup}"],
    "powersgd-r8": ["train.grad_compression=powersgd", "train.grad_compression_rank=8"],
    "powersgd-r16": ["train.grad_compression=powersgd", "train.grad_compression_rank=16"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench comm`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--config", default="configs/tiny-synthetic.yaml", help="the config every row trains")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every row")  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated rows: {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=300, help="training steps per row (default: 300)")
    parser.add_argument("--processes", type=int, default=2, help="processes per run (default: 2)")
    parser.add_argument("--data", help="data to train on (default: the config's data.train)")
    parser.add_argument("--out", help="keep the rows' run folders here (default: a temporary folder, removed)")
    parser.add_argument("--heldout-batches", type=int, default=8,
                        help="fixed held-out batches the final loss is scored on (default: 8)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny data, a few steps (for tests)")


def _modes(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"--modes {spec}: rows are {', '.join(MODES)}")
    return names


def _launch(args, config_file: Path) -> subprocess.CompletedProcess:
    """One ``accelerate launch`` of ``mlm train`` on CPU processes, one torch thread each."""
    accelerate = Path(sys.executable).with_name("accelerate")
    with socket.socket() as probe:  # a free port: the next row's launch must not race for the default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [str(accelerate), "launch", "--main_process_port", str(port), "--multi_gpu", "--num_processes",
           str(args.processes), "--num_machines", "1"]  # fmt: skip
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mlm.cli", "train", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _logged(metrics: Path, name: str) -> list[float]:
    """Every logged value of one metric, in step order."""
    with metrics.open() as f:
        return [float(row["value"]) for row in csv.DictReader(f) if row["name"] == name]


def _bytes_per_step(metrics: Path) -> float | None:
    """Mean of the logged grad_bytes_per_step values (None when the run had no hook)."""
    values = _logged(metrics, "grad_bytes_per_step")
    return sum(values) / len(values) if values else None


def _row(args, name: str, data: str, root: Path) -> dict:
    """Train one mode and read its summary, metrics and parameter count."""
    from mlm.bench.ablate import QUICK
    from mlm.config import load_config
    from mlm.model import MLMModel

    run_dir = root / name
    base = load_config(args.config, args.overrides).train
    switches = [s.format(warmup=base.warmup_steps) for s in MODES[name]]
    sets = [*(QUICK if args.quick else []), *args.overrides, f"data.train={data}", f"train.output_dir={run_dir}",
            f"train.max_steps={args.steps}", "train.max_time_s=0", "train.save_every=0", "train.eval_every=0",
            "train.trackers=[csv]", f"train.batch_size={max(1, base.batch_size // args.processes)}",
            *switches]  # fmt: skip
    if args.quick:
        sets += ["train.log_every=1", "train.batch_size=4"]
    config = load_config(args.config, sets)
    config_file = root / f"{name}.yaml"
    config.save(config_file)
    result = _launch(args, config_file)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"bench comm: the {name} run failed (exit {result.returncode}): " + " | ".join(tail))
    summary = json.loads((run_dir / "summary.json").read_text())
    model = MLMModel.from_pretrained(Path(summary["last_checkpoint"]) / "model")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what DDP reduces
    heldout = _heldout(args, model, config, data)
    fp32 = 4 * params
    sent = _bytes_per_step(run_dir / "metrics.csv") or fp32  # no hook: DDP all-reduces the fp32 gradient
    drift = _logged(run_dir / "metrics.csv", "grad_drift")
    return {
        "mode": name,
        "switches": switches,
        "steps": summary["steps"],
        "processes": summary["processes"],
        "global_batch": summary["global_batch"],
        "bytes_per_step": round(sent, 1),
        "bytes_ratio": round(sent / fp32, 4),
        "step_s": round(summary["time_s"] / max(summary["steps"], 1), 4),
        "samples_per_s": summary["samples_per_s"],
        "loss": summary["final_losses"].get("loss"),
        "heldout_loss": round(heldout, 5),
        "drift": round(drift[-1], 4) if drift else None,  # error carried at the end, in steps' worth of gradient
    }


def _heldout(args, model, config, data: str) -> float:
    """The final model's objective on fixed batches of the val split (the same batches for every row)."""
    from mlm.train.calibration import calibration_batches, heldout_loss

    _threads(2)
    batch_size = 4 if args.quick else config.train.batch_size * args.processes
    batches = calibration_batches(model, config, data, "val", 1 if args.quick else args.heldout_batches, batch_size)
    return heldout_loss(model, config, batches)


def _threads(n: int) -> None:
    """Score with the machine's threads (the runs used one per process)."""
    import torch

    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Train every mode; return the report and a Markdown table."""
    from mlm.data.synthetic import generate

    names = _modes(args.modes)
    if args.steps < 1 or args.processes < 2:
        raise ValueError("--steps must be >= 1 and --processes >= 2 (one process communicates nothing)")
    if args.quick:
        args.steps = min(args.steps, 4)
    with tempfile.TemporaryDirectory(prefix="mlm-bench-comm-") as tmp:
        data = args.data
        if args.quick and not data:
            generate(Path(tmp) / "data", n_images=40, size=32, seed=0)
            data = str(Path(tmp) / "data")
        if not data:
            from mlm.config import load_config

            data = load_config(args.config, args.overrides).data.train
        root = Path(args.out) if args.out else Path(tmp) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        rows = {name: _row(args, name, data, root) for name in names}
    base = rows.get("none")
    for row in rows.values():
        for key, gap_key in (("loss", "loss_gap_pct"), ("heldout_loss", "heldout_gap_pct")):
            gap = None
            if base is not None and base[key] and row[key] is not None:
                gap = round(100.0 * (row[key] - base[key]) / base[key], 2)
            row[gap_key] = gap
    report = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "processes": args.processes,
              "data": args.data or "config", "rows": rows}  # fmt: skip
    return report, _table(report)


def _table(report: dict) -> str:
    """Markdown: one row per mode."""
    lines = [
        f"{report['processes']} processes (gloo), {report['steps']} steps, config {report['config']}",
        "",
        "| mode | bytes/step | vs fp32 | step s | samples/s | loss | gap to none | held-out loss | gap to none "
        "| drift |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def pct(value) -> str:
        return "—" if value is None else f"{value:+.2f}%"

    for row in report["rows"].values():
        gap = pct(row["loss_gap_pct"])
        drift = "—" if row["drift"] is None else f"{row['drift']:.2f}"
        loss = "—" if row["loss"] is None else f"{row['loss']:.4f}"
        lines.append(f"| {row['mode']} | {row['bytes_per_step']:,.0f} | {row['bytes_ratio']:.3f} | {row['step_s']:.3f} "
                     f"| {row['samples_per_s']:.1f} | {loss} | {gap} | {row['heldout_loss']:.4f} "
                     f"| {pct(row['heldout_gap_pct'])} | {drift} |")  # fmt: skip
    return "\n".join(lines)
