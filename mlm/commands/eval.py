"""``mlm eval TASK``: score VQA answers, captions or retrieval embeddings and write a report.

Each task reads its predictions from a file in the official format (``--predictions``), so results of any model,
ours or another, can be scored the same way. Without a TASK, ``mlm eval --checkpoint DIR --data SOURCE --task ...``
runs a model and scores it (see :mod:`mlm.commands.eval_model`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command group with one sub-command per task."""
    from mlm.commands.eval_model import add_model_arguments, run_model

    parser = sub.add_parser("eval", help="evaluate a checkpoint or predictions: VQAv2, captions, retrieval")
    add_model_arguments(parser)
    parser.set_defaults(func=run_model)
    tasks = parser.add_subparsers(dest="task", required=False, metavar="TASK")

    vqa = tasks.add_parser("vqa", help="official VQAv2 accuracy, overall and per answer/question type")
    _add_source(vqa, "results JSON [{'question_id', 'answer'}] (official VQAv2 results format)")
    vqa.add_argument("--questions", required=True, help="official VQAv2 questions JSON")
    vqa.add_argument("--annotations", required=True, help="official VQAv2 annotations JSON")
    vqa.set_defaults(func=run_vqa)

    caption = tasks.add_parser("caption", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)")
    _add_source(caption, "results JSON [{'image_id', 'caption'}] (COCO caption results format)")
    caption.add_argument("--annotations", required=True, help="COCO captions JSON with the reference captions")
    caption.add_argument(
        "--tokenizer",
        choices=("auto", "ptb", "simple"),
        default="auto",
        help="ptb (Stanford, needs Java), simple (lower-case, no punctuation) or auto (ptb when Java is found)",
    )
    caption.add_argument(
        "--metrics", default="BLEU,METEOR,ROUGE-L,CIDEr", help="comma-separated subset of BLEU,METEOR,ROUGE-L,CIDEr"
    )
    caption.set_defaults(func=run_caption)

    retrieval = tasks.add_parser("retrieval", help="Recall@1/5/10 both ways, mean recall, median rank")
    _add_source(retrieval, "safetensors file with image_embeds (N,E), text_embeds (M,E), text_to_image (M,)")
    retrieval.add_argument("--chunk-size", type=int, default=1024, help="queries scored at once")
    retrieval.set_defaults(func=run_retrieval)

    for task in (vqa, caption, retrieval):
        task.add_argument("--out", help="folder for metrics.json, report.md and figures")


def _add_source(parser: argparse.ArgumentParser, predictions_help: str) -> None:
    """The group naming where the predictions come from (exactly one source)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", metavar="FILE", help=predictions_help)


def _finish(metrics: dict, args: argparse.Namespace, title: str, figures: dict | None = None) -> int:
    """Print the metric table and, with ``--out``, write the report files."""
    from mlm.eval.report import markdown_table, write_report

    print(markdown_table(metrics), end="")
    if args.out:
        paths = write_report(metrics, args.out, title, figures=figures)
        print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def run_vqa(args: argparse.Namespace) -> int:
    """Score a VQAv2 results file against questions + annotations."""
    from mlm.eval.plots import plot_vqa_types
    from mlm.eval.vqa import load_vqa_annotations, load_vqa_results, vqa_accuracy

    annotations = load_vqa_annotations(args.annotations, args.questions)
    predictions = load_vqa_results(args.predictions)
    metrics = vqa_accuracy(predictions, annotations)
    figures = None
    if args.out:
        figures = {"VQA accuracy per type": plot_vqa_types(metrics, Path(args.out) / "vqa_types.png")}
    return _finish(metrics, args, f"VQAv2 accuracy: {Path(args.predictions).name}", figures)


def run_caption(args: argparse.Namespace) -> int:
    """Score a COCO caption results file against reference captions."""
    from mlm.eval.captioning import caption_metrics, load_caption_results, load_coco_captions

    metrics_names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    references = load_coco_captions(args.annotations)
    predictions = load_caption_results(args.predictions)
    if len(predictions) < len(references):
        logger.info("scoring the %d of %d annotated images that have a prediction", len(predictions), len(references))
    metrics = caption_metrics(predictions, references, metrics=metrics_names, tokenizer=args.tokenizer)
    return _finish(metrics, args, f"Caption metrics: {Path(args.predictions).name}")


def run_retrieval(args: argparse.Namespace) -> int:
    """Score saved image/text embeddings for retrieval."""
    from mlm.eval.retrieval import load_embeddings, retrieval_metrics

    tensors = load_embeddings(args.predictions)
    metrics = retrieval_metrics(
        tensors["image_embeds"], tensors["text_embeds"], tensors["text_to_image"], chunk_size=args.chunk_size
    )
    return _finish(metrics, args, f"Retrieval: {Path(args.predictions).name}")
