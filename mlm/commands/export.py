"""``mlm export CHECKPOINT --out DIR [--merge-lora]``: write a trained model as one self-contained model folder;
``mlm export onnx CHECKPOINT OUT [--max-len L] [--int8]``: write it as ONNX graphs (:mod:`mlm.runtime.onnx_export`).

The checkpoint may be a model, checkpoint or run folder (a run folder means its latest checkpoint). With
``--merge-lora`` the LoRA adapters of a ``train.lora`` run are folded into the weights and the folder holds a plain
model (config.json, generation_config.json, model.safetensors, tokenizer.json) that loads without PEFT's files.
The ONNX folder runs with ``mlm caption --runtime onnx --checkpoint OUT``.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    parser = sub.add_parser(
        "export", help="write a trained model as a model folder (optionally merging LoRA), or as ONNX graphs",
        usage="mlm export CHECKPOINT --out DIR [--merge-lora] | mlm export onnx CHECKPOINT OUT [--max-len L] [--int8]",
    )  # fmt: skip
    parser.add_argument("paths", nargs="+", metavar="[onnx] CHECKPOINT [OUT]",
                        help="model, checkpoint step_* or run folder; 'onnx' first for ONNX graphs")  # fmt: skip
    parser.add_argument("--out", help="new folder to write (must not exist or be empty)")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights")
    parser.add_argument("--max-len", type=int, help="ONNX: longest prompt + generated text in tokens "
                        "(default: model.max_text_len + the checkpoint's max_new_tokens)")  # fmt: skip
    parser.add_argument("--int8", action="store_true", help="ONNX: INT8 weights (ONNX Runtime's MatMulNBits at 8 bits; "
                        "other weights stored as int8 rows), one shared weights file")  # fmt: skip
    parser.set_defaults(func=run)


def _targets(args: argparse.Namespace) -> tuple[bool, str, str]:
    """(onnx?, checkpoint, out) from the positional paths and --out; ValueError names a wrong combination."""
    paths = list(args.paths)
    onnx = paths[0] == "onnx" and len(paths) > 1
    if onnx:
        paths.pop(0)
    if len(paths) == 2 and args.out is None:
        paths, args.out = paths[:1], paths[1]
    if len(paths) != 1 or args.out is None:
        raise ValueError("usage: mlm export CHECKPOINT --out DIR, or mlm export onnx CHECKPOINT OUT")
    if onnx and args.merge_lora:
        raise ValueError("--merge-lora: merge with a plain export first, then export that folder as onnx")
    if not onnx and (args.max_len is not None or args.int8):
        raise ValueError(f"{'--max-len' if args.max_len is not None else '--int8'} applies to mlm export onnx only "
                         "(INT8 PyTorch models: mlm compress CHECKPOINT OUT --int8)")  # fmt: skip
    return onnx, paths[0], args.out


def run(args: argparse.Namespace) -> int:
    """Load, optionally merge, save (or export ONNX graphs); print what was written."""
    from mlm.lora import has_lora, merge_lora
    from mlm.model import MLMModel
    from mlm.run_folder import check_new_folder, resolve_checkpoint

    onnx, checkpoint, args.out = _targets(args)
    if onnx:
        return _run_onnx(checkpoint, args.out, args.max_len, args.int8)
    out = check_new_folder(args.out, f"--out {args.out}")
    folder = resolve_checkpoint(checkpoint)
    model = MLMModel.from_pretrained(str(folder))
    adapted = has_lora(model)
    if args.merge_lora:
        if adapted:
            merge_lora(model)
        else:
            logger.warning("%s has no LoRA adapters; exporting it unchanged", folder)
    model.save_pretrained(out)
    if args.merge_lora and adapted:
        kind = "LoRA adapters merged into the weights"
    else:
        kind = "with its LoRA adapters" if adapted else "plain"
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} from {folder} ({kind}; {sum(p.numel() for p in model.parameters()):,} parameters): {files}")
    return 0


def _run_onnx(checkpoint: str, out: str, max_len: int | None, int8: bool = False) -> int:
    """Export the three graphs and print their checks."""
    from mlm.inference import load_model
    from mlm.runtime.onnx_export import export_onnx

    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ValueError(f"mlm export onnx needs the onnx extra: pip install -e '.[onnx]' ({err})") from err
    if max_len is not None and max_len < 2:
        raise ValueError(f"--max-len {max_len}: must be at least 2")
    model = load_model(checkpoint, "cpu")
    manifest = export_onnx(model, out, total_len=max_len, int8=int8)
    checks = ", ".join(f"{name} {diff:.1e}" for name, diff in manifest["max_abs_difference"].items())
    weights = "INT8 weights" if int8 else "weights"
    print(f"wrote {out}: image.onnx, text.onnx, decoder_step.onnx (up to {manifest['total_len']} tokens), {weights} "
          f"in {manifest['weights']['file']}; largest difference to the float model: {checks}")  # fmt: skip
    return 0
