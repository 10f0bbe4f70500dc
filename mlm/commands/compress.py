"""``mlm compress CHECKPOINT OUT [--int8] [--prune-heads R] [--prune-ffn R] [--prune-dim R] [--calib DATA]``: a
smaller model folder.

``--prune-heads`` / ``--prune-ffn`` remove that share of every attention module's heads and every feed-forward's
channels, ``--prune-dim`` that share of the residual stream's channels (the model's width, :mod:`mlm.compress.width`),
the least important on calibration data (:mod:`mlm.compress.prune`); the result is a float model of a smaller
config, ready to fine-tune or distill (``mlm distill``). ``--int8`` is post-training dynamic INT8 of the
Linear layers (:mod:`mlm.compress.int8`; ``--engine torchao`` or ``fbgemm``), after pruning when both are asked.
The folder is written beside OUT under a temporary name and renamed when it is complete, so a failure leaves nothing
half-written. It loads with the normal loader (``MLMModel.from_pretrained`` and every ``mlm`` command),
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
    parser.add_argument("--prune-heads", type=float, default=0.0, metavar="R", help="share of heads to remove")
    parser.add_argument("--prune-ffn", type=float, default=0.0, metavar="R", help="share of FFN channels to remove")
    parser.add_argument(
        "--prune-dim", type=float, default=0.0, metavar="R", help="share of the width (model.dim) to remove"
    )
    parser.add_argument(
        "--calib", metavar="DATA", help="calibration source for pruning (default: the run's data.train)"
    )
    parser.add_argument("--calib-split", default="train", help="split of a synth folder or Karpathy file (train)")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    parser.add_argument("--calib-batch-size", type=int, default=32, help="records per calibration batch (32)")
    parser.set_defaults(func=run)


def _size(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def _prune(model, folder: Path, args: argparse.Namespace):
    """Rank heads and channels on the calibration data and remove the asked shares; print what changed and return
    the pruned model (a new one when the width changes)."""
    from mlm.compress import prune, width
    from mlm.train import calibration

    config = calibration.run_settings(model, folder)
    spec = args.calib or config.data.train
    if not spec:
        raise ValueError("--calib DATA: pruning ranks heads and channels on calibration data; name a data source")
    batches = calibration.calibration_batches(
        model, config, spec, args.calib_split, args.calib_batches, args.calib_batch_size
    )
    loss_fn = calibration.calibration_loss(config)
    lines = []
    if args.prune_heads or args.prune_ffn:
        scores = prune.importance(model, batches, loss_fn)
        lines.append(prune.prune(model.eval(), scores, args.prune_heads, args.prune_ffn).line())
    if args.prune_dim:
        narrow = width.narrower_model(model, args.prune_dim)
        axes = width.residual_axes(model, narrow)
        before = prune.parameter_count(model)
        model = width.prune_width(model, narrow, axes, width.channel_importance(model, axes, batches, loss_fn))
        after = prune.parameter_count(model)
        lines.append(f"width {config.model.dim} -> {model.config.dim}, parameters {before:,} -> {after:,} "
                     f"({after / before:.3f}x)")  # fmt: skip
    cfg = model.config
    settings = {"dim": cfg.dim, "mla.n_heads": cfg.mla.n_heads, "ffn_hidden_dim": cfg.ffn_hidden_dim}
    if cfg.attention == "gqa":  # key/value heads are a GQA setting only
        settings["mla.n_kv_heads"] = cfg.mla.n_kv_heads
    print(
        f"pruned on {len(batches)} calibration batches of {spec}: {'; '.join(lines)}; fine-tune or distill it "
        f"with {' '.join(f'--set model.{k}={v}' for k, v in settings.items())}"
    )
    return model


def run(args: argparse.Namespace) -> int:
    """Load on the CPU, prune and/or quantize, write to a temporary folder, rename; print what was written."""
    from mlm.compress import int8
    from mlm.compress.prune import check_ratio
    from mlm.compress.qat import ACTIVATIONS
    from mlm.model import MLMModel
    from mlm.run_folder import check_new_folder, resolve_checkpoint, run_config, write_folder

    ratios = [check_ratio(f"--prune-{what}", getattr(args, f"prune_{what}")) for what in ("heads", "ffn", "dim")]
    pruning = any(r > 0 for r in ratios)
    if not args.int8 and not pruning:
        raise ValueError("choose a compression: --int8, --prune-heads R, --prune-ffn R or --prune-dim R")
    out = check_new_folder(args.out)  # before the model loads: fail fast
    folder = resolve_checkpoint(args.checkpoint)
    if (folder / int8.QUANT_FILE).is_file():
        raise ValueError(f"{folder}: already compressed ({int8.QUANT_FILE}); compress the float model")
    model = MLMModel.from_pretrained(str(folder)).eval()
    if pruning:
        model = _prune(model, folder, args)
    if not args.int8:
        write_folder(out, model.save_pretrained)
        before, after = _size(folder), _size(out)
        print(f"wrote {out}: model.safetensors {before:,} -> {after:,} bytes ({after / before:.3f}x)")
        return 0
    qat = bool((run_config(folder) or {}).get("train", {}).get("qat"))  # trained for the QAT input scheme
    names = int8.quantize_int8(model, engine=args.engine, activations=ACTIVATIONS if qat else "symmetric")
    write_folder(out, model.save_pretrained)
    before, after = _size(folder), _size(out)
    scheme = f"{args.engine}, {ACTIVATIONS} inputs as trained with train.qat" if qat else args.engine
    print(f"wrote {out}: {len(names)} Linear layers in dynamic INT8 ({scheme}), model.safetensors "
          f"{before:,} -> {after:,} bytes ({after / before:.3f}x)")  # fmt: skip
    return 0
