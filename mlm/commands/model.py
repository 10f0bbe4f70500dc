"""``mlm model summary [CONFIG]``: parameter counts per module and decoding cache bytes per generated token."""

from __future__ import annotations

import argparse
from collections import defaultdict


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``model`` command group."""
    parser = sub.add_parser("model", help="inspect the model a config builds")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    summary = actions.add_parser("summary", help="parameters per module and KV-cache bytes per generated token")
    summary.add_argument("config", nargs="?", default=None, help="YAML config file (default: the built-in defaults)")
    summary.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    summary.add_argument("--depth", type=int, default=1, help="module depth of the table (1 = top-level modules)")
    summary.set_defaults(func=show_summary)


def parameter_table(model, depth: int = 1) -> list[tuple[str, int, int]]:
    """Return (module name, parameters, trainable) rows grouped by the first ``depth`` name parts.

    Each tensor is counted once, under the first module that holds it (a tied LM head counts with the embedding).
    """
    if depth < 1:
        raise ValueError(f"--depth={depth} must be >= 1")
    total: dict[str, int] = defaultdict(int)
    trainable: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():  # named_parameters skips tensors already seen (tied weights)
        group = ".".join(name.split(".")[:depth])
        total[group] += param.numel()
        trainable[group] += param.numel() if param.requires_grad else 0
    children = {name for name, _ in model.named_children()}
    order = sorted(total, key=lambda group: group.split(".")[0] not in children)  # sub-modules, then loose params
    return [(group, total[group], trainable[group]) for group in order]


def format_summary(model, depth: int = 1) -> str:
    """Return the printable summary: model shape, parameter table, totals and cache bytes."""
    m = model.config
    rows = parameter_table(model, depth)
    n_total = sum(r[1] for r in rows)
    n_trainable = sum(r[2] for r in rows)
    width = max(len("module"), *(len(r[0]) for r in rows))
    lines = [
        f"attention={m.attention} dim={m.dim} layers={m.n_layers} levels={','.join(m.levels)} sharing={m.sharing} "
        f"decoder_layers={m.decoder_layers} vocab={m.vocab_size} image={m.image_size}px/{m.patch_size}",
        f"{'module':<{width}}  {'params':>12}  {'trainable':>12}  {'share':>6}",
    ]
    for name, count, train in rows:
        lines.append(f"{name:<{width}}  {count:>12,}  {train:>12,}  {100 * count / max(n_total, 1):>5.1f}%")
    lines.append(f"{'total':<{width}}  {n_total:>12,}  {n_trainable:>12,}  {100.0:>5.1f}%")
    cache = model.kv_cache_bytes()
    dtype = str(model.logit_scale.dtype).replace("torch.", "")
    lines.append(
        f"KV cache per generated token: {cache['per_token']:,} bytes ({dtype}; encoder text blocks "
        f"{cache['encoder']:,} + decoder {cache['decoder']:,}); image latent for cross-attention: "
        f"{cache['per_image']:,} bytes per image"
    )
    return "\n".join(lines)


def show_summary(args: argparse.Namespace) -> int:
    """Build the model of a config on CPU and print its summary."""
    from mlm.commands import config_from_args
    from mlm.model import MLMModel

    model = MLMModel(config_from_args(args).model).eval()
    print(format_summary(model, args.depth))
    return 0
