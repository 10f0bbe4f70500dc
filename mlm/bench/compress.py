"""``mlm bench compress --checkpoint CKPT``: the float model against its compressed forms, same data, same run.

Per variant: size of model.safetensors, parameters, CPU latency (caption a batch greedily, and embed a batch of
images and texts) at each ``--threads`` count, and text→image R@1, VQA accuracy and CIDEr from our evaluation code.
Ratios are to the float model measured in the same run. Variants so far: ``float``, ``int8-torchao`` and
``int8-fbgemm`` (:mod:`mlm.compress.int8`), ``int8-qat`` (with ``--qat-checkpoint``: a ``train.qat`` fine-tune of the
checkpoint, converted as ``mlm compress`` converts it), ``pruned`` and ``pruned-int8`` (with ``--pruned-checkpoint``:
an ``mlm compress --prune-*`` model, usually recovered by fine-tuning or ``mlm distill``), ``student`` (with
``--student-checkpoint``: a distilled smaller model), ``exit`` and ``exit-T`` (with ``--exit-checkpoint``: a model
trained with ``model.early_exit``, at full depth and at each ``--exit-thresholds`` T; ``blocks`` is the mean number
of encoder blocks an image ran during the scoring), ``onnx`` (the float model's graphs run by ONNX Runtime,
:mod:`mlm.runtime`; its size is that of the three graphs and their shared weights file, its thread count ONNX
Runtime's intra-op threads) and ``onnx-int8`` (the same with INT8 weights, ``mlm export onnx --int8``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)
VARIANTS = ("float", "int8-torchao", "int8-fbgemm", "onnx", "onnx-int8")  # float always runs: the ratios' baseline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench compress`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--checkpoint", required=True, help="model, checkpoint or run folder (float)")
    parser.add_argument("--data", help="evaluation source (default: data.test of the run that trained it)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=16, help="images per timed batch")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="caption length of the timed captioning")
    parser.add_argument("--max-samples", type=int, default=0, help="records scored per task (0: all)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--qat-checkpoint", help="a train.qat fine-tune of --checkpoint: adds an int8-qat row")
    parser.add_argument("--pruned-checkpoint", help="a pruned model (mlm compress --prune-*): pruned, pruned-int8 rows")
    parser.add_argument("--student-checkpoint", help="a distilled student (mlm distill): adds a student row")
    parser.add_argument("--engine", choices=("torchao", "fbgemm"), default="fbgemm", help="INT8 of the pruned row")
    parser.add_argument("--exit-checkpoint", help="a model trained with model.early_exit: adds exit rows")
    parser.add_argument("--exit-thresholds", default="0.9,0.95,0.98", help="comma-separated early-exit thresholds")


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _latency(model_at, pixels, texts, threads: list[int], repeats: int, max_new_tokens: int) -> dict:
    """Median seconds to caption and to embed the batch, per thread count; ``model_at(n)`` is the model to time at n
    threads (runtimes such as ONNX Runtime fix their threads when loaded)."""
    import torch

    from mlm.inference import embed_texts

    before = torch.get_num_threads()
    out = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            model = model_at(n)
            with torch.no_grad():
                out[f"caption_s_{n}t"] = _median_s(
                    lambda model=model: model.generate(pixels, max_new_tokens=max_new_tokens, num_beams=1), repeats
                )
                out[f"embed_s_{n}t"] = _median_s(
                    lambda model=model: (model.encode_image(pixels, normalize=True), embed_texts(model, texts)), repeats
                )
    finally:
        torch.set_num_threads(before)
    return out


def _thresholds(text: str) -> list[float]:
    """The early-exit thresholds of ``--exit-thresholds``, each in [0, 1]."""
    try:
        values = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--exit-thresholds {text}: comma-separated numbers in [0, 1]") from None
    if not values or not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"--exit-thresholds {text}: comma-separated numbers in [0, 1]")
    return values


def _quality(model, records, max_samples: int) -> dict:
    from mlm.commands.eval_model import eval_config
    from mlm.eval.runner import evaluate

    cfg = eval_config(model, [f"eval.max_samples={max_samples}"] if max_samples else [])
    results = evaluate(model, records, ["retrieval", "vqa", "caption"], cfg, caption_metric_names=["CIDEr"])
    return {"t2i_R@1": results["retrieval"]["text_to_image_R@1"], "vqa": results["vqa"]["overall"],
            "CIDEr": results["caption"]["CIDEr"]}  # fmt: skip


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Compress the checkpoint in a temporary folder, measure every variant; return the report and a table."""
    import torch

    from mlm.commands.eval_model import _run_test_data
    from mlm.compress import int8
    from mlm.compress.qat import ACTIVATIONS
    from mlm.eval.runner import open_eval_source
    from mlm.inference import image_batches, image_transform, load_model
    from mlm.run_folder import resolve_checkpoint
    from mlm.runtime.onnx_export import check_exportable, export_onnx
    from mlm.runtime.onnx_int8 import folder_bytes
    from mlm.runtime.onnx_model import load_onnx_model

    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if not threads or min(threads) < 1 or args.repeats < 1 or args.batch_size < 1:
        raise ValueError("--threads, --repeats and --batch-size must be positive")
    chosen = {v.strip() for v in str(args.variants).split(",") if v.strip()} | {"float"}
    if chosen - set(VARIANTS):
        raise ValueError(f"--variants: unknown {', '.join(sorted(chosen - set(VARIANTS)))}; choose from "
                         f"{', '.join(VARIANTS)}")  # fmt: skip
    folder = resolve_checkpoint(args.checkpoint)
    data = args.data or _run_test_data(args.checkpoint)
    if not data:
        raise ValueError(f"give --data SOURCE: {args.checkpoint} has no run config naming data.test")
    records = list(open_eval_source(data, split=args.split))
    float_model = load_model(folder, "cpu")
    captioned = [r for r in records if not r.is_vqa and r.captions][: args.batch_size]
    _, pixels = next(image_batches([r.image for r in captioned], image_transform(float_model), args.batch_size))
    texts = [r.captions[0] for r in captioned]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlm-bench-compress-") as tmp:
        variants = [("float", folder, float_model)]

        def quantized(name: str, source, **options) -> None:
            model = load_model(source, "cpu")
            int8.quantize_int8(model, **options)
            model.save_pretrained(Path(tmp) / name)
            variants.append((name, Path(tmp) / name, load_model(Path(tmp) / name)))

        for engine in (e for e in int8.ENGINES if f"int8-{e}" in chosen):
            quantized(f"int8-{engine}", folder, engine=engine)
        if args.qat_checkpoint:
            quantized("int8-qat", args.qat_checkpoint, activations=ACTIVATIONS)
        if args.pruned_checkpoint:
            pruned = resolve_checkpoint(args.pruned_checkpoint)
            variants.append(("pruned", pruned, load_model(pruned, "cpu")))
            quantized("pruned-int8", pruned, engine=args.engine)
        if args.student_checkpoint:
            student = resolve_checkpoint(args.student_checkpoint)
            variants.append(("student", student, load_model(student, "cpu")))
        if args.exit_checkpoint:
            exits = resolve_checkpoint(args.exit_checkpoint)
            variants.append(("exit", exits, load_model(exits, "cpu")))
            for t in _thresholds(args.exit_thresholds):
                variants.append((f"exit-{t:g}", exits, load_model(exits, "cpu", exit_threshold=t)))
        for name, path, model in variants:
            row = {
                "variant": name,
                "size_bytes": (path / "model.safetensors").stat().st_size,
                "params": int8.parameter_count(model),
            }
            row.update(_latency(lambda n, m=model: m, pixels, texts, threads, args.repeats, args.max_new_tokens))
            if model.exit_threshold is not None:
                model.early_exit.reset_counts()  # count the blocks of the scored images only
            row.update(_quality(model, records, args.max_samples))
            exited = model.exit_threshold is not None
            row["blocks"] = model.early_exit.mean_blocks() if exited else float(model.config.n_layers)
            rows.append(row)
        skipped = {}
        for name in (v for v in ("onnx", "onnx-int8") if v in chosen):
            try:
                check_exportable(float_model)
            except ValueError as err:  # e.g. a short convolution: the other rows still run
                skipped[name] = str(err)
                logger.warning("bench compress: row %s skipped: %s", name, err)
                continue
            graphs = Path(tmp) / name
            export_onnx(float_model, graphs, int8=name == "onnx-int8")
            row = {"variant": name, "size_bytes": folder_bytes(graphs), "params": rows[0]["params"]}
            row.update(_latency(lambda n, g=graphs: load_onnx_model(g, n), pixels, texts, threads, args.repeats,
                                args.max_new_tokens))  # fmt: skip
            row.update(_quality(load_onnx_model(graphs), records, args.max_samples))
            row["blocks"] = rows[0]["blocks"]
            rows.append(row)
    base = rows[0]
    timed = [f"{what}_s_{n}t" for n in threads for what in ("caption", "embed")]
    for row in rows:
        row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
        for key in timed:
            row[f"{key}_ratio"] = row[key] / base[key]
        for key in ("t2i_R@1", "vqa", "CIDEr"):
            row[f"{key}_delta"] = row[key] - base[key]
    report = {"checkpoint": str(folder), "data": str(data), "split": args.split, "batch_size": len(texts),
              "threads": threads, "torch_version": torch.__version__, "rows": rows, "skipped": skipped}  # fmt: skip
    return report, _table(report)


def _table(report: dict) -> str:
    threads = report["threads"]
    head = ["variant", "size MB", "× size", "params", "blocks"]
    head += [f"{what} s ({n}t) ×" for n in threads for what in ("caption", "embed")]
    head += ["t2i R@1", "VQA", "CIDEr"]
    lines = [f"| {' | '.join(head)} |", "|" + " --- |" * len(head)]
    for r in report["rows"]:
        cells = [r["variant"], f"{r['size_bytes'] / 1e6:.2f}", f"{r['size_ratio']:.3f}", f"{r['params']:,}",
                 f"{r['blocks']:.2f}"]  # fmt: skip
        for n in threads:
            for what in ("caption", "embed"):
                key = f"{what}_s_{n}t"
                cells.append(f"{r[key]:.3f} ({r[key + '_ratio']:.2f}×)")
        cells += [f"{r['t2i_R@1']:.1f} ({r['t2i_R@1_delta']:+.1f})", f"{r['vqa']:.1f} ({r['vqa_delta']:+.1f})",
                  f"{r['CIDEr']:.1f} ({r['CIDEr_delta']:+.1f})"]  # fmt: skip
        lines.append(f"| {' | '.join(cells)} |")
    where = f"{report['checkpoint']} on {report['data']} ({report['split']})"
    title = f"mlm bench compress: {where}, batch {report['batch_size']}"
    return "\n".join([title, *lines])
