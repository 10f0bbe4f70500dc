"""``mlm compress CHECKPOINT OUT --int8``: a smaller model folder for CPU inference.

``--int8`` is post-training dynamic INT8 of the Linear layers (:mod:`mlm.compress.int8`; ``--engine torchao`` or
``fbgemm``). The folder is written beside OUT under a temporary name and renamed when it is complete, so a failure
leaves nothing half-written. It loads with the normal loader (``MLMModel.from_pretrained`` and every ``mlm`` command),
on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlm.compress import ENGINES


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compress`` command."""
    parser = sub.add_parser("compress", help="write a compressed model folder (INT8) for CPU inference")
    parser.add_argument("checkpoint", help="model folder, checkpoint step_* folder or run folder")
    parser.add_argument("out", help="new folder to write (must not exist or be empty)")
    parser.add_argument("--int8", action="store_true", help="dynamic INT8 of the Linear layers")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="torchao",
        help="INT8 kernels: torchao (maintained) or fbgemm via torch.ao (deprecated, faster on CPU)",
    )
    parser.set_defaults(func=run)


def _size(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def run(args: argparse.Namespace) -> int:
    """Load on the CPU, compress, write to a temporary folder, rename; print what was written."""
    from mlm.compress import int8
    from mlm.compress.qat import ACTIVATIONS
    from mlm.model import MLMModel
    from mlm.run_folder import check_new_folder, resolve_checkpoint, run_config, write_folder

    if not args.int8:
        raise ValueError("choose a compression: --int8")
    out = check_new_folder(args.out)  # before the model loads: fail fast
    folder = resolve_checkpoint(args.checkpoint)
    if (folder / int8.QUANT_FILE).is_file():
        raise ValueError(f"{folder}: already compressed ({int8.QUANT_FILE}); compress the float model")
    model = MLMModel.from_pretrained(str(folder)).eval()
    qat = bool((run_config(folder) or {}).get("train", {}).get("qat"))  # trained for the QAT input scheme
    names = int8.quantize_int8(model, engine=args.engine, activations=ACTIVATIONS if qat else "symmetric")
    write_folder(out, model.save_pretrained)
    before, after = _size(folder), _size(out)
    scheme = f"{args.engine}, {ACTIVATIONS} inputs as trained with train.qat" if qat else args.engine
    print(f"wrote {out}: {len(names)} Linear layers in dynamic INT8 ({scheme}), model.safetensors "
          f"{before:,} -> {after:,} bytes ({after / before:.3f}x)")  # fmt: skip
    return 0
