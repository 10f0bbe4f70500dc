"""``mlm bench NAME``: benchmarks that print a table and write JSON; each lives in ``mlm.bench.<name>``.

Each benchmark module exposes ``add_arguments(parser)`` (no heavy imports) and ``run(args) -> (report, table)``:
the report is written as JSON with ``--json OUT`` and the table is printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

BENCHES = {
    "ablate": ("mlm.bench.ablate", "one row per design switch at one budget: Δ retrieval, VQA, shape accuracy"),
    "comm": ("mlm.bench.comm", "compressed DDP gradients: bytes per step, step time and loss per mode, 2 processes"),
    "compress": (
        "mlm.bench.compress",
        "float vs INT8 (torchao, fbgemm): size, CPU latency, R@1, VQA, CIDEr",
    ),
    "data": ("mlm.bench.data", "data loading throughput (samples/s) for 0, 1, 2 workers"),
    "mla": ("mlm.bench.mla", "MHA vs GQA vs MLA: parameters, KV-cache bytes, prefill and decode speed"),
    "probe": ("mlm.bench.probe", "linear probes: how much of each object's shape the image states hold"),
    "quality": ("mlm.bench.quality", "ours vs open_clip CoCa at one wall-clock budget: retrieval, CIDEr, VQA"),
    "scale": ("mlm.bench.scale", "attention levels vs length: forward + backward time, saved memory, growth exponent"),
    "serve": ("mlm.bench.serve", "mlm serve: throughput and latency percentiles, batching on vs off; a mixed run"),
    "train": ("mlm.bench.train", "training samples/s, FLOPs and GEMM share: ours vs open_clip CoCa, same batches"),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` command group."""
    parser = sub.add_parser("bench", help="benchmarks (JSON + a readable table)")
    names = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (module_name, help_text) in BENCHES.items():
        bench = names.add_parser(name, help=help_text)
        bench.add_argument("--json", dest="json_out", metavar="OUT", help="also write the results as JSON here")
        module = importlib.import_module(module_name)
        module.add_arguments(bench)
        bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark named by ``args.bench``, print its table and write its JSON report."""
    report, table = importlib.import_module(BENCHES[args.bench][0]).run(args)
    print(table)
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0
