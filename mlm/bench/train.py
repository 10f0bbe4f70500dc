"""``mlm bench train``: training speed of our model against open_clip's CoCa at the same widths, on the same batches.

One process, one thread count. Each model runs ``--steps`` optimizer steps (forward, backward, AdamW) on batches
drawn from one data source through our tokenizer, transforms and collate; the two models alternate step by step so
that machine noise hits both alike, and the median step time is reported. Model FLOPs per sample come from
``torch.utils.flop_counter`` over one forward + backward, and the share of this machine's fp32 GEMM peak uses a
large matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

DEFAULT_CONFIG = "configs/tiny-synthetic.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench train`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"model and training config (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", help="source to train on (default: synthetic scenes made in a temporary folder)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default: 3)")
    parser.add_argument("--batch-size", type=int, help="records per step (default: the config's train.batch_size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def gemm_peak_gflops(size: int = 1024, repeats: int = 10) -> float:
    """fp32 GFLOP/s of a size^3 matmul on this machine now (the best of a few runs)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def train_flops(step_fn) -> int:
    """FLOPs of one forward + backward, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step_fn()
    return counter.get_total_flops()


def _ours(config, tokenizer, source):
    """Our model, optimizer and loss; returns (model, step function on a batch, forward+backward function)."""
    from mlm.data.word_targets import resolve_targets, word_documents
    from mlm.model import MLMModel
    from mlm.train.losses import ImageTextLoss, learned_words, word_idf
    from mlm.train.schedule import build_optimizer

    model = MLMModel(config.model, tokenizer=tokenizer).train()
    optimizer = build_optimizer(model, config.train)
    # the words the trainer's objective would learn (build_dataset falls back to answers as the trainer does)
    targets = resolve_targets(source, config.train.word_targets)
    words = word_documents(source, targets) if config.train.word_weight else []
    if words and model.decoder.grounding is not None:
        model.decoder.grounding.start_words(learned_words(tokenizer, words))
    train = config.train if words else dataclasses.replace(config.train, word_weight=0.0)
    loss_fn = ImageTextLoss.from_config(train, idf=word_idf(tokenizer, words) if words else None)

    def forward_backward(batch):
        out = model(batch["images"], batch["text_ids"], batch["text_mask"])
        loss, _ = loss_fn(out, batch)
        loss.backward()
        return loss

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(batch)
        optimizer.step()

    return model, step, forward_backward


def _batches(config, spec: str | None, batch_size: int, tmp: str, tokenizer=None):
    """The tokenizer (trained on the data unless given) and an endless iterator of training batches (caption and
    VQA records mixed as in training)."""
    import torch

    from mlm.data.collate import Collate
    from mlm.data.dataset import build_dataset
    from mlm.data.sources import open_source
    from mlm.data.synthetic import generate
    from mlm.data.tokenizer import MLMTokenizer
    from mlm.data.turns import image_key
    from mlm.train.sampler import GlobalBatchSampler, SeededItems

    if not spec:
        generate(tmp, n_images=400, size=config.model.image_size, seed=0, holdout=False)
        spec = tmp
    source = open_source(spec, config.data, "train")
    if tokenizer is None:
        tokenizer = MLMTokenizer.from_config(config.data.tokenizer, source.texts(), config.data.vocab_size)
    config.model.vocab_size = tokenizer.vocab_size
    dataset = build_dataset(source, tokenizer, config, train=True)
    is_vqa = torch.tensor([r.is_vqa for r in source])
    keys = [image_key(r) for r in source] if config.train.vqa_same_images else None
    sampler = GlobalBatchSampler(len(dataset), batch_size, config.train.seed, 0, 1, is_vqa=is_vqa,
                                 vqa_fraction=config.train.vqa_fraction, image_keys=keys)  # fmt: skip
    items, collate = SeededItems(dataset, config.train.seed), Collate(tokenizer.pad_id)

    def endless():
        epoch = 0
        while True:
            for keys in sampler.keyed_batches(epoch, 0):
                yield collate([items[k] for k in keys])
            epoch += 1

    return tokenizer, endless(), source


def _measure(steps: dict, batches, n_steps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate the models' steps on the same batches; seconds per timed step for each."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + n_steps):
        batch = next(batches)
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Measure samples/s, step time, FLOPs and GEMM share for ours and CoCa; return the report and a table."""
    import torch

    from mlm.bench.coca import CoCaTrainer, build_coca
    from mlm.config import load_config

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0; got {args.steps}, {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    batch_size = args.batch_size or config.train.batch_size
    torch.manual_seed(config.train.seed)
    with tempfile.TemporaryDirectory(prefix="mlm-bench-train-") as tmp:
        tokenizer, batches, source = _batches(config, args.data, batch_size, tmp)
        ours, ours_step, ours_fb = _ours(config, tokenizer, source)
        coca = build_coca(config.model, tokenizer.vocab_size, tokenizer.pad_id)
        coca_trainer = CoCaTrainer(coca, tokenizer.pad_id, config.train.lr, config.train.weight_decay)
        probe = next(batches)
        flops = {"ours": train_flops(lambda: ours_fb(probe)), "coca": train_flops(lambda: coca_trainer.step(probe))}
        times = _measure({"ours": ours_step, "coca": coca_trainer.step}, batches, args.steps, args.warmup)
    peak = gemm_peak_gflops()
    report = {"config": args.config, "overrides": args.overrides, "batch_size": batch_size,
              "threads": torch.get_num_threads(), "steps": args.steps, "gemm_peak_gflops": round(peak, 1)}  # fmt: skip
    for name, model in (("ours", ours), ("coca", coca)):
        step_s = statistics.median(times[name])
        achieved = flops[name] / step_s / 1e9
        report[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "step_s": round(step_s, 4),
            "samples_per_s": round(batch_size / step_s, 1),
            "flops_per_sample": int(flops[name] / batch_size),
            "achieved_gflops": round(achieved, 1),
            "peak_share": round(achieved / peak, 3),
        }
    report["ratio"] = round(report["ours"]["samples_per_s"] / report["coca"]["samples_per_s"], 3)
    return report, _table(report)


def _table(report: dict) -> str:
    """The report as a Markdown table."""
    lines = [
        f"training speed, batch {report['batch_size']}, {report['threads']} threads, median of {report['steps']} "
        f"steps; fp32 GEMM peak {report['gemm_peak_gflops']} GFLOP/s",
        "| model | params | step s | samples/s | MFLOP/sample | GFLOP/s | share of peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("ours", "ours (shared MLA encoder)"), ("coca", "open_clip CoCa")):
        r = report[name]
        speed = f"{r['step_s']:.3f} | {r['samples_per_s']:.1f}"
        work = f"{r['flops_per_sample'] / 1e6:.1f} | {r['achieved_gflops']:.1f} | {r['peak_share']:.2f}"
        lines.append(f"| {label} | {r['params']:,} | {speed} | {work} |")
    lines.append(f"ours / CoCa samples/s: {report['ratio']:.2f}x")
    return "\n".join(lines)
