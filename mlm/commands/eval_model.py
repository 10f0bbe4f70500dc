"""``mlm eval --checkpoint DIR --data SOURCE --task retrieval|vqa|caption|all|zeroshot``: evaluate a trained model.

The model-based form of ``mlm eval`` (the ``vqa|caption|retrieval --predictions`` forms score result files): it
loads a checkpoint, runs :func:`mlm.eval.runner.evaluate` on a data source and writes ``metrics.json``,
``report.md``, figures and the predictions in the official result formats into ``--out``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

TASK_CHOICES = ("retrieval", "vqa", "caption", "all", "zeroshot")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the model-based form to the ``eval`` parser."""
    group = parser.add_argument_group("evaluate a checkpoint (instead of a TASK with --predictions)")
    group.add_argument("--checkpoint", metavar="DIR", help="model folder, checkpoint step_* folder or run folder")
    group.add_argument(
        "--data", metavar="SOURCE", help="a data source (captions_test.json, a synth folder...); default: data.test"
    )
    group.add_argument(
        "--task",
        dest="model_task",
        action="append",
        metavar="TASK",
        help=f"one of {', '.join(TASK_CHOICES)} (repeatable or comma-separated; default: all)",
    )
    group.add_argument("--split", default="test", help="split of a Karpathy file or synth folder (default: test)")
    group.add_argument("--out", dest="eval_out", metavar="DIR", help="report folder (default: runs/eval/<name>)")
    group.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    group.add_argument("--vqa-mode", choices=("generative", "rank"), help="default: eval.vqa_mode of the config")
    group.add_argument("--shuffled-images", action="store_true",
                       help="vqa: answer every question again about another image; the drop per type is what the "
                       "image explains (eval.vqa_shuffled)")  # fmt: skip
    group.add_argument("--candidates", metavar="FILE", help="rank mode: answers, one per line (default: the data's)")
    group.add_argument("--caption-tokenizer", choices=("auto", "ptb", "simple"), default="auto")
    group.add_argument("--caption-metrics", default="BLEU,METEOR,ROUGE-L,CIDEr", help="subset, comma-separated")
    group.add_argument("--templates", metavar="FILE", help="zeroshot: templates, one per line, {} for the class")
    group.add_argument("--image-column", default="filepath", help="zeroshot CSV: the image-path column")
    group.add_argument("--label-column", default="label", help="zeroshot CSV: the class-name column")
    group.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    group.add_argument(
        "--exit-threshold",
        type=float,
        metavar="T",
        help="early exit: an image stops at its first exit with agreement >= T (model.early_exit)",
    )
    group.add_argument(
        "--set",
        dest="eval_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an eval.* or data.* setting, e.g. --set eval.batch_size=16 (repeatable)",
    )


def check_overrides(overrides: list[str]) -> None:
    """Raise ConfigError for a ``--set`` that is not an eval.* or data.* setting."""
    from mlm.config import ConfigError

    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(("eval.", "data.")):
            raise ConfigError(
                f"--set {item}: only eval.* and data.* can be set here; the model comes from the checkpoint"
            )


def eval_config(model, overrides: list[str]):
    """A run config for evaluating ``model``: its model settings, the default data and eval settings with decoding
    as the checkpoint saved it, and the eval.*/data.* overrides applied."""
    from mlm.config import Config, EvalConfig, apply_overrides, config_from_dict

    check_overrides(overrides)
    data = Config(model=model.config, eval=EvalConfig.from_decoding(model.generation_config)).to_dict()
    return config_from_dict(apply_overrides(data, overrides))


def _run_test_data(checkpoint: str) -> str:
    """data.test of the run that trained a checkpoint (the run config beside it), or "" when there is none."""
    from mlm.run_folder import resolve_checkpoint, run_config

    config = run_config(resolve_checkpoint(checkpoint)) or {}  # <run>/checkpoints/step_N/model has one beside it
    return str(config.get("data", {}).get("test", "") or "")


def _read_candidates(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--candidates: no such file: {file}")
    answers = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"--candidates {file}: no answers in it (one answer per line)")
    return answers


def _default_out(checkpoint: str, data: str, task: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(checkpoint).resolve().name}-{Path(data).stem}-{task}")
    return Path("runs") / "eval" / slug.strip("-")


def run_model(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a data source and write the report."""
    if not args.checkpoint:
        raise ValueError(
            "give a TASK (vqa|caption|retrieval) with --predictions FILE, or --checkpoint DIR [--data SOURCE]"
        )
    check_overrides(args.eval_overrides)
    from mlm.eval.report import summary_table
    from mlm.eval.runner import evaluate, open_eval_source
    from mlm.inference import load_model

    tasks = [t.strip() for task in args.model_task or ["all"] for t in task.split(",") if t.strip()]
    if "zeroshot" in tasks:
        if tasks != ["zeroshot"]:
            raise ValueError("--task zeroshot reads --data as a classification folder or CSV: run it on its own")
        return run_zeroshot(args)
    model = load_model(args.checkpoint, args.device, args.exit_threshold)
    cfg = eval_config(model, args.eval_overrides)
    if args.vqa_mode:
        cfg.eval.vqa_mode = args.vqa_mode
    if args.shuffled_images:
        cfg.eval.vqa_shuffled = True
    data = args.data or _run_test_data(args.checkpoint)
    if not data:
        raise ValueError(f"give --data SOURCE: {args.checkpoint} has no run config naming data.test")
    source = open_eval_source(data, cfg.data, args.split)
    out = Path(args.eval_out) if args.eval_out else _default_out(args.checkpoint, data, "+".join(tasks))
    results = evaluate(
        model,
        source,
        tasks,
        cfg,
        out_dir=out,
        candidates=_read_candidates(args.candidates) if args.candidates else None,
        caption_tokenizer=args.caption_tokenizer,
        caption_metric_names=[m.strip() for m in args.caption_metrics.split(",") if m.strip()],
        title=f"{args.checkpoint} on {data} ({args.split})",
    )
    table = summary_table(results)
    print(table if args.markdown else re.sub(r"^\| --- .*\n", "", table, flags=re.M), end="")
    if model.exit_threshold is not None:
        blocks = model.early_exit.mean_blocks()
        print(f"early exit at {model.exit_threshold}: {blocks:.2f} of {model.config.n_layers} encoder blocks per image")
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and figures")
    return 0


def run_zeroshot(args: argparse.Namespace) -> int:
    """Zero-shot classification of a labelled image folder or CSV; prints one line (a table with --markdown)."""
    from mlm.eval.plots import plot_confusion
    from mlm.eval.report import markdown_table, write_report
    from mlm.eval.zeroshot import choose_templates, open_classification, zeroshot_classify
    from mlm.inference import load_model

    if not args.data:
        raise ValueError("--task zeroshot needs --data FOLDER_OR_CSV (one sub-folder per class, or image,label rows)")
    data = open_classification(args.data, args.image_column, args.label_column)
    templates = choose_templates(data, args.templates)
    model = load_model(args.checkpoint, args.device, args.exit_threshold)
    cfg = eval_config(model, args.eval_overrides)
    metrics = zeroshot_classify(model, data, templates, cfg.eval.batch_size)
    out = Path(args.eval_out) if args.eval_out else _default_out(args.checkpoint, args.data, "zeroshot")
    figure = plot_confusion(metrics["confusion"], metrics["classes"], out / "confusion.png")
    shown = {k: v for k, v in metrics.items() if k not in ("confusion", "classes", "templates", "unknown_class_words")}
    write_report(metrics, out, f"Zero-shot classification: {args.checkpoint} on {args.data}", {"Confusion": figure})
    topk = next((k for k in metrics if k.startswith("top") and k != "top1"), "top1")  # one class: top-1 only
    if args.markdown:
        print(markdown_table(shown), end="")
    else:
        counts = f"{metrics['num_images']} images, {metrics['num_classes']} classes, {len(templates)} templates"
        print(f"zero-shot {Path(args.data).name}: top-1 {metrics['top1']:.2f}, {topk[:3]}-{topk[3:]} "
              f"{metrics[topk]:.2f}, mean per class {metrics['mean_per_class']:.2f} ({counts})")  # fmt: skip
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and {figure.name}")
    return 0
