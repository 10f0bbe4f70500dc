"""``mlm train --config CONFIG [--set k=v ...] [--resume latest|DIR] [--init-from DIR]``: train or fine-tune a model.

``mlm distill --teacher DIR --config STUDENT.yaml [...]`` is the same run with ``train.distill.teacher`` set: the
student also learns the teacher's similarity and token distributions (:mod:`mlm.train.distill`).

Multi-process: ``accelerate launch --num_processes N -m mlm.cli train --config ...`` (DDP); FSDP and DeepSpeed
through accelerate's own config files (``accelerate launch --config_file fsdp.yaml -m mlm.cli train ...``).
"""

from __future__ import annotations

import argparse
import sys

from mlm.commands import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``distill`` commands."""
    parser = sub.add_parser(
        "train",
        help="train a model (contrastive + captioning/VQA) with accelerate",
        description="Train with HF accelerate. Run folder: train.output_dir (checkpoints/, metrics.csv, logs/, "
        "summary.json, curves.png). SIGTERM/SIGINT save a checkpoint and exit cleanly.",
    )
    _add_run_args(parser)
    parser = sub.add_parser(
        "distill",
        help="train a student on a teacher's distributions and the ground truth (knowledge distillation)",
        description="mlm train with train.distill.teacher set: KL to the teacher's image-text similarities and "
        "token distributions joins the student's own objective. Resumable like mlm train.",
    )
    parser.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's model/checkpoint/run folder")
    _add_run_args(parser)


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument(
        "--resume",
        metavar="latest|DIR",
        help="continue from the newest checkpoint of train.output_dir (latest) or from a checkpoint folder",
    )
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        help="fine-tune: start from this model/checkpoint/run folder's weights and tokenizer, with a fresh optimizer "
        "and schedule (sets train.init_from; with --resume, a run that has checkpoints of its own continues from them)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; exit 0 when finished or stopped cleanly, 1 after too many non-finite steps or out of memory."""
    from mlm.train.guards import NonFiniteLossError, OutOfMemory
    from mlm.train.loop import train

    config = config_from_args(args)
    if args.init_from:
        config.train.init_from = args.init_from
    if getattr(args, "teacher", None):
        config.train.distill.teacher = args.teacher
    if config.train.distill.teacher:
        from mlm.train.distill import teacher_folder

        teacher_folder(config)  # a missing teacher fails before any data is read
    try:
        summary = train(config, resume=args.resume)
    except (NonFiniteLossError, OutOfMemory) as err:
        print(f"mlm train: {err}", file=sys.stderr)
        return 1
    parts = [f"{summary['steps']} steps", f"{summary['samples_per_s']:.1f} samples/s"]
    parts += [f"{k}={v:.4f}" for k, v in summary["final_losses"].items()]
    print(f"{summary['status']}: {', '.join(parts)}; checkpoint {summary['last_checkpoint']}")
    for name, value in summary["validation"].items():
        print(f"  {name}: {value:.2f}")
    return 0
