"""``mlm bench data``: data-loading throughput (samples/s) through the real decode, transforms, tokenizer and collate
for DataLoader(num_workers=0, 1, 2), on a given source or a small synthetic set made in a temporary folder."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench data`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--data", help="source to read (default: synthesize --images scenes in a temp folder)")
    parser.add_argument("--split", default="train", help="split of the source")
    parser.add_argument("--images", type=int, default=1000, help="synthetic images when --data is not given")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values")
    parser.add_argument("--max-batches", type=int, default=0, help="stop each run after this many batches (0: all)")


def measure(loader, max_batches: int = 0) -> dict:
    """Iterate a DataLoader once; samples/s over all batches after the first (worker start-up excluded)."""
    start = time.perf_counter()
    first = None
    samples = 0
    for i, batch in enumerate(loader):
        if first is None:
            first = time.perf_counter()
        else:
            samples += len(batch["images"])
        if max_batches and i + 1 >= max_batches:
            break
    end = time.perf_counter()
    steady = end - (first or end)
    return {
        "samples": samples,
        "seconds": round(steady, 4),
        "samples_per_s": round(samples / steady, 1) if steady > 0 else 0.0,
        "first_batch_s": round((first or end) - start, 4),
    }


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Measure samples/s per worker count; return the JSON report and a readable table."""
    import torch

    from mlm.config import Config
    from mlm.data.dataset import build_loader
    from mlm.data.sources import open_source
    from mlm.data.synthetic import generate
    from mlm.data.tokenizer import MLMTokenizer

    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="mlm-bench-data-") as tmp:
        spec = args.data
        if not spec:
            generate(tmp, n_images=args.images, size=args.image_size, seed=0, holdout=False)
            spec = tmp
        cfg = Config()
        cfg.model.image_size = args.image_size
        source = open_source(spec, cfg.data, args.split)
        tokenizer = MLMTokenizer.train_wordpiece(source.texts(), cfg.data.vocab_size)
        rows = []
        for n in workers:
            cfg.data.num_workers = n
            loader = build_loader(source, tokenizer, cfg, train=True, batch_size=args.batch_size)
            rows.append({"num_workers": n, **measure(loader, args.max_batches)})
    result = {
        "source": args.data or f"synthetic ({args.images} images)",
        "records": len(source),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
        "results": rows,
    }
    lines = [
        f"data loading: {result['source']}, {len(source)} records, batch {args.batch_size}, {args.image_size}px",
        f"{'num_workers':>12} {'samples/s':>12} {'samples':>9} {'first batch s':>14}",
    ]
    for row in rows:
        lines.append(
            f"{row['num_workers']:>12} {row['samples_per_s']:>12.1f} {row['samples']:>9} {row['first_batch_s']:>14.3f}"
        )
    return result, "\n".join(lines)
