"""``mlm bench scale``: forward + backward cost of each attention level against sequence length.

For 1-D sequences (256 → 8,192 tokens, bidirectional) and 2-D patch grids (16² → 64²), each level runs on its fast
path (:mod:`mlm.layers.level_attention`) and on the dense boolean mask it is tested against; ``global`` is full
attention (SDPA with no mask) and ``routed`` a local window plus ``--routed-tokens`` routed keys. Reported per level
and length: the median forward + backward time, the bytes autograd saves for backward (the activation memory a
training step holds, each storage once; on CUDA also the peak allocated), and the growth exponent fitted over the
lengths from ``--fit-from`` on. Dense masks above ``--dense-max`` tokens are skipped (their (T, T) scores outgrow
memory). ``--paths`` adds ``flex`` (FlexAttention, compiled per shape; the first call, untimed, compiles it), and
``--forward-only`` times inference (no gradients: FlexAttention has no CPU backward); routed levels have no flex path.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import time

logger = logging.getLogger(__name__)

LEVELS = ("global", "local", "regional", "routed")
PATHS = ("sparse", "dense", "flex")
TARGETS = {"local_speedup_4096": 5.0, "local_memory_4096": 0.2, "routed_over_global_4096": 4.0, "exponent": 1.2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options (no heavy imports here)."""
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192],
                        help="1-D sequence lengths (default 256 ... 8192)")  # fmt: skip
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32, 48, 64],
                        help="sides of the square 2-D patch grids (default 16 32 48 64)")  # fmt: skip
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS), help="(default: all)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--head-dim", type=int, default=32, help="query/key/value dims per head (default 32)")
    parser.add_argument("--batch-size", type=int, default=1, help="(default 1)")
    parser.add_argument("--window", type=int, default=64, help="1-D local window each side (default 64)")
    parser.add_argument("--window-2d", type=int, default=7, help="side of the 2-D neighbourhood (default 7)")
    parser.add_argument("--region", type=int, default=64, help="1-D region size (default 64)")
    parser.add_argument("--region-2d", type=int, default=8, help="side of a 2-D region (default 8)")
    parser.add_argument("--routed-tokens", type=int, default=64, help="routed keys p (default 64)")
    parser.add_argument("--dense-max", type=int, default=8192, help="longest dense-mask reference (default 8192)")
    parser.add_argument("--fit-from", type=int, default=1024, help="fit exponents from this length (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point (default 3)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["sparse", "dense"],
                        help="paths to time: sparse (blocked), dense (mask), flex (default sparse dense)")  # fmt: skip
    parser.add_argument("--forward-only", action="store_true", help="time inference (no backward, nothing saved)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")


def fit_exponent(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(length): the growth exponent of a cost."""
    xs, ys = [math.log(x) for x in lengths], [math.log(max(y, 1e-12)) for y in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _pattern(args, level: str, n: int, grid, impl: str):
    """The level's pattern (routed: with random router scores) for n tokens."""
    import torch

    from mlm.layers.level_attention import LevelPattern, RoutedPattern

    sizes = dict(window=args.window, window_2d=args.window_2d, region=args.region, region_2d=args.region_2d)
    base = LevelPattern(level, n, False, grid, **sizes, impl=impl)
    if level != "routed":
        return base
    scores = torch.randn(args.batch_size, n, device=args.device, generator=torch.Generator(args.device).manual_seed(0))
    return RoutedPattern(base, scores, min(args.routed_tokens, n))


def _measure(args, level: str, n: int, grid, impl: str) -> dict:
    """Median forward + backward seconds and saved bytes of one level at one size."""
    import torch

    from mlm.layers.attention import attend

    device = torch.device(args.device)
    shape = (args.batch_size, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, requires_grad=not args.forward_only) for _ in range(3))
    pattern = _pattern(args, level, n, grid, impl)
    saved: dict[int, int] = {}

    def pack(t):  # one entry per storage: views of one tensor and a tensor saved twice hold its memory once
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    times = []
    for i in range(args.repeats + 1):  # the first call builds cached masks and index tables
        saved.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(not args.forward_only):
            out = attend(q, k, v, pattern, args.head_dim**-0.5)
        if not args.forward_only:
            out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "saved_bytes": sum(saved.values())}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _sweep(args, sizes: list[int], grid_of) -> dict:
    """{level: {path: {size: result}}} over the sizes (grid_of(size) -> grid or None)."""
    out = {}
    for level in args.levels:
        out[level] = {path: {} for path in args.paths}
        for size in sizes:
            grid = grid_of(size)
            n = size * size if grid else size
            for path in args.paths:
                if path == "dense" and (n > args.dense_max or level == "global"):  # global's dense is itself
                    continue
                if path == "flex" and level == "routed":  # routed keys are chosen per input: blocked path only
                    continue
                out[level][path][str(n)] = result = _measure(args, level, n, grid, path)
                logger.info("%s %s %s n=%d: %.4fs", "2-D" if grid else "1-D", level, path, n, result["seconds"])
    return out


def _exponents(sweep: dict, fit_from: int) -> dict:
    """Fitted growth exponent of time per level and path, over the lengths >= fit_from."""
    out = {}
    for level, paths in sweep.items():
        for path, points in paths.items():
            ns = [int(n) for n in points if int(n) >= fit_from]
            if len(ns) >= 2:
                out[f"{level}_{path}"] = fit_exponent(ns, [points[str(n)]["seconds"] for n in ns])
    return out


def _targets(one_d: dict, exponents: dict) -> dict:
    """The issue's ratios at 4,096 tokens (1-D), where measured."""
    out = {}
    local, glob, routed = one_d.get("local"), one_d.get("global"), one_d.get("routed")
    if local and "4096" in local.get("dense", {}) and "4096" in local.get("sparse", {}):
        sparse, dense = local["sparse"]["4096"], local["dense"]["4096"]
        out["local_speedup_4096"] = dense["seconds"] / sparse["seconds"]
        if dense["saved_bytes"]:  # nothing is saved when timing the forward only
            out["local_memory_4096"] = sparse["saved_bytes"] / dense["saved_bytes"]
    if routed and glob and "4096" in routed.get("sparse", {}) and "4096" in glob.get("sparse", {}):
        out["routed_over_global_4096"] = glob["sparse"]["4096"]["seconds"] / routed["sparse"]["4096"]["seconds"]
    met = {}
    for name, value in out.items():
        goal = TARGETS[name]
        met[name] = value <= goal if name.endswith("memory_4096") else value >= goal
    for level in ("local", "regional"):
        if f"{level}_sparse" in exponents:
            met[f"{level}_exponent"] = exponents[f"{level}_sparse"] <= TARGETS["exponent"]
    return {**out, "met": met}


def _table(title: str, sweep: dict, exponents: dict) -> str:
    """One readable block: seconds (and saved MiB) per level, path and length, then the exponents."""
    lengths = sorted({int(n) for paths in sweep.values() for pts in paths.values() for n in pts})
    lines = [f"== {title} ==", f"{'level':10}{'path':8}" + "".join(f"{n:>16}" for n in lengths)]
    for level, paths in sweep.items():
        for path, points in paths.items():
            if not points:
                continue
            cells = []
            for n in lengths:
                r = points.get(str(n))
                cells.append(f"{r['seconds']:>8.4f}s{r['saved_bytes'] / 2**20:>6.0f}M" if r else f"{'-':>16}")
            exp = exponents.get(f"{level}_{path}")
            lines.append(f"{level:10}{path:8}" + "".join(cells) + (f"   n^{exp:.2f}" if exp is not None else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Run the 1-D and 2-D sweeps; return the JSON report and the readable tables."""
    import torch

    if min(args.lengths + args.grids) < 1 or args.repeats < 1:
        raise ValueError(
            f"--lengths, --grids and --repeats must be >= 1; got {args.lengths}, {args.grids}, {args.repeats}"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if "flex" in args.paths and not args.forward_only and not args.device.startswith("cuda"):
        raise ValueError("--paths flex on the CPU needs --forward-only: torch has no FlexAttention backward there")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    one_d = _sweep(args, args.lengths, lambda n: None)
    two_d = _sweep(args, args.grids, lambda side: (side, side))
    exp_1d, exp_2d = _exponents(one_d, args.fit_from), _exponents(two_d, args.fit_from)
    report = {
        "one_d": one_d,
        "two_d": two_d,
        "exponents": {"one_d": exp_1d, "two_d": exp_2d},
        "targets": _targets(one_d, exp_1d),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "json_out") and not callable(v)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    tables = [_table("1-D (tokens)", one_d, exp_1d), _table("2-D (patches)", two_d, exp_2d)]
    tables.append("targets: " + ", ".join(f"{k}={v:.2f}" for k, v in report["targets"].items() if k != "met"))
    tables.append("met: " + ", ".join(f"{k}={v}" for k, v in report["targets"]["met"].items()))
    return report, "\n\n".join(tables)
