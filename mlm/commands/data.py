"""``mlm data synth`` (write the synthetic benchmark) and ``mlm data check`` (read every record as training would)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlm.commands import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group."""
    parser = sub.add_parser("data", help="make and check datasets")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    synth = actions.add_parser("synth", help="write the synthetic shapes benchmark (COCO + VQAv2 + Karpathy files)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--images", type=int, default=2000, help="images in train+val+test (80/10/10)")
    synth.add_argument("--eval-images", type=int, help="images in val and in test each (default: a tenth of --images)")
    synth.add_argument(
        "--classify-images",
        type=int,
        help="single-object scenes of the classification view (default: as many as test; 0: none)",
    )
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-holdout", dest="holdout", action="store_false",
                       help="no held-out colour-shape pairs and no compositional split")  # fmt: skip
    synth.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (same output)")
    synth.set_defaults(func=run_synth)

    check = actions.add_parser("check", help="load every record of a source; count skips per reason")
    check.add_argument("source", help="annotation file, dataset folder, shard pattern, or any folder to scan")
    check.add_argument("--format", help="data format (default: detected from the path)")
    check.add_argument("--split", help="split of a Karpathy file, synth folder or saved DatasetDict")
    check.add_argument("--strict", action="store_true", help="stop at the first problem and exit 1")
    check.add_argument("--no-images", dest="images", action="store_false", help="check annotations only")
    check.add_argument("--json", dest="json_out", metavar="OUT", help="also write the counts as JSON here")
    add_config_args(check, required=False)
    check.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    """Write the benchmark and print the split sizes."""
    import time

    from mlm.data.synthetic import generate
    from mlm.data.synthetic_ceiling import split_ceiling
    from mlm.data.synthetic_classify import write_classification

    if args.classify_images is not None and args.classify_images < 0:
        raise ValueError(f"--classify-images={args.classify_images}: give 0 (no classification view) or more")
    start = time.perf_counter()
    sizes = generate(args.out, args.images, args.size, args.seed, args.holdout, args.workers, args.eval_images)
    n_classify = sizes["test"] if args.classify_images is None else args.classify_images
    views = write_classification(args.out, n_classify, args.size, args.seed, args.holdout) if n_classify else []
    seconds = time.perf_counter() - start
    view = f"; {n_classify} single-object images for " + " and ".join(p.name for p in views) if views else ""
    print(f"wrote {sum(sizes.values())} images to {args.out} in {seconds:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sizes.items()) + view)  # fmt: skip
    ceilings = {split: split_ceiling(args.out, split) for split in ("test", "compositional") if split in sizes}
    print("text→image R@1 ceiling (partial captions fit several images): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))  # fmt: skip
    return 0


def _data_config(args: argparse.Namespace):
    from mlm.config import DataConfig, load_config

    cfg = load_config(args.config, args.overrides).data if (args.config or args.overrides) else DataConfig()
    if args.format:
        from mlm.data.sources import FORMATS

        if args.format not in FORMATS:
            raise ValueError(f"--format {args.format}: not a data format; choose one of {', '.join(FORMATS)}")
        cfg.format = args.format
    cfg.strict = cfg.strict or args.strict
    return cfg


def _targets(source: str, cfg) -> list[tuple[str, str | None]]:
    """The sources to check: the one given, or every annotation file and image of a folder that is no dataset."""
    from mlm.data.sources import detect_format, scan_folder

    if cfg.format == "auto" and Path(source).is_dir():
        try:
            detect_format(source)
        except ValueError:
            return scan_folder(source)
    return [(source, None)]


def check_source(spec: str, fmt: str | None, cfg, split: str | None, images: bool):
    """Open one source and decode every image; returns (title, SkipStats or None, error message or None)."""
    import logging

    from mlm.data.records import DataError

    try:
        return _check_source(spec, fmt, cfg, split, images)
    except (DataError, ValueError, FileNotFoundError):
        raise
    except OSError as err:  # unreadable file or folder: a property of the data, not of mlm
        return spec, None, f"cannot read: {err}"
    except Exception as err:  # noqa: BLE001 - a checker reports what it cannot read instead of dying on it
        logging.getLogger(__name__).debug("unexpected error checking %s", spec, exc_info=True)
        return spec, None, f"unexpected {type(err).__name__}: {err} (a bug in mlm; run with -v for the traceback)"


def _check_source(spec: str, fmt: str | None, cfg, split: str | None, images: bool):
    import dataclasses

    from tqdm import tqdm

    from mlm.data.images import decode_image
    from mlm.data.records import DataError
    from mlm.data.sources import open_source

    cfg = dataclasses.replace(cfg, format=fmt or cfg.format)
    try:
        source = open_source(spec, cfg, split)
    except (DataError, ValueError, FileNotFoundError) as err:
        if cfg.strict:
            raise
        return f"{spec}", None, str(err)
    stats = source.stats
    decoded: dict = {}  # image -> notes or DataError, so an image shared by many questions is decoded once
    if images:
        for i in tqdm(range(len(source)), desc=Path(spec).name, unit="rec", file=sys.stderr, leave=False):
            record = source[i]
            key = i if isinstance(record.image, bytes) else record.image
            if key not in decoded:
                try:
                    decoded[key] = decode_image(record.image, cfg.max_image_pixels, record.origin)[1]
                except DataError as err:
                    decoded[key] = err
            outcome = decoded[key]
            if isinstance(outcome, DataError):
                stats.skip(outcome.reason, record.origin, outcome.detail)  # raises under --strict
            else:
                for note in outcome:
                    stats.fix(note, record.origin)
    return f"{spec} ({source.kind}{', split ' + split if split else ''})", stats, None


def run_check(args: argparse.Namespace) -> int:
    """Print one table per source and a total; exit 1 under --strict at the first problem."""
    from mlm.data.records import DataError

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # file names that are not valid UTF-8 still print
    cfg = _data_config(args)
    results = []
    try:
        for spec, fmt in _targets(args.source, cfg):
            results.append(check_source(spec, fmt, cfg, args.split, args.images))
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"mlm data check: strict: {err}", file=sys.stderr)
        return 1
    total_read = total_kept = 0
    report = []
    for title, stats, error in results:
        if error is not None:
            print(f"source: {title}\n  unreadable: {error}")
            report.append({"source": title, "error": error})
            continue
        print(stats.table(f"source: {title}"))
        total_read, total_kept = total_read + stats.read, total_kept + stats.kept
        report.append({"source": title, **stats.to_dict()})
    failed = sum(1 for _, _, e in results if e is not None)
    print(f"total: {len(results)} source(s), {failed} unreadable, records read {total_read}, kept {total_kept}, "
          f"skipped {total_read - total_kept}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 1 if failed == len(results) else 0
