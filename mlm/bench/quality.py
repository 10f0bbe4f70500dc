"""``mlm bench quality``: ours against open_clip's CoCa at the same widths, data, seed and wall-clock budget.

Both models train for ``--budget-s`` seconds on the same batches (our data pipeline: tokenizer, transforms,
collate, the seeded batch order), each with warmup + cosine over the steps that fit its own measured step time, and
both are scored by our evaluation code on one split: retrieval both ways and CIDEr for both; VQA overall and per
question type for ours (CoCa has no question-answering path of its own). CoCa is open_clip's class, not ours.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench quality`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--config", default="configs/tiny-synthetic.yaml", help="our model, data and schedule")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per model (default: 600)")
    parser.add_argument("--split", default="test", help="split scored (default: test)")
    parser.add_argument("--quick", action="store_true", help="tiny models, tiny data, a few seconds (for tests)")


def _config(args, tmp: str):
    from mlm.bench.ablate import QUICK
    from mlm.config import load_config
    from mlm.data.synthetic import generate

    # both models' schedules are sized by the same probe (steps_within); refitting ours mid-run would favour it
    sets = [*(QUICK if args.quick else []), "train.fit_steps_to_time=false", *args.overrides,
            f"train.output_dir={Path(tmp) / 'ours'}",
            "train.save_every=0", "train.eval_every=0", "train.trackers=[]"]  # fmt: skip
    if args.quick:
        generate(Path(tmp) / "data", n_images=40, size=32, seed=0)
        sets += [f"data.train={Path(tmp) / 'data'}", f"data.val={Path(tmp) / 'data'}"]
    return load_config(args.config, sets)


def train_ours(config, budget_s: float) -> tuple[object, dict]:
    """Our model trained for the budget through the normal training loop; returns (model, summary)."""
    from mlm.bench.ablate import steps_within
    from mlm.train.loop import Trainer

    probe = Trainer(config)
    batches = probe._micro_batches()
    config.train.max_steps = steps_within(lambda: probe.train_step(batches), budget_s, warmup=1, timed=4)
    config.train.max_time_s = budget_s
    trainer = Trainer(config)
    return trainer.unwrapped, trainer.fit()


def train_coca(config, tokenizer, batches, budget_s: float, device):
    """open_clip CoCa at our widths trained for the budget on our batches, on our model's device (and, on CUDA,
    in bf16 autocast as ours); returns (model, summary)."""
    import torch

    from mlm.bench.ablate import steps_within
    from mlm.bench.coca import CoCaTrainer, build_coca
    from mlm.train.schedule import build_scheduler

    def fresh():
        torch.manual_seed(config.train.seed)
        coca = build_coca(config.model, tokenizer.vocab_size, tokenizer.pad_id).to(device)
        return coca, CoCaTrainer(coca, tokenizer.pad_id, config.train.lr, config.train.weight_decay)

    def on_device():
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        _, probe = fresh()  # a throwaway copy sizes the schedule, so the scored model starts from step 0
        steps = steps_within(lambda: probe.step(on_device()), budget_s, warmup=1, timed=4)
        coca, trainer = fresh()
        train = type(config.train)(**{**vars(config.train), "max_steps": steps})
        scheduler = build_scheduler(trainer.optimizer, train)
        start, steps = time.perf_counter(), 0
        while steps < train.max_steps and time.perf_counter() - start < budget_s:
            trainer.step(on_device())
            scheduler.step()
            steps += 1
    return coca, {"steps": steps, "time_s": round(time.perf_counter() - start, 2)}


def _scores(model, data: str, split: str, with_vqa: bool, eval_cfg) -> dict:
    from mlm.eval.runner import evaluate

    tasks = ["retrieval", "caption", "vqa"] if with_vqa else ["retrieval", "caption"]
    results = evaluate(model, data, tasks, eval_cfg, split=split, caption_metric_names=["CIDEr"])
    out = {"t2i_R@1": results["retrieval"]["text_to_image_R@1"], "i2t_R@1": results["retrieval"]["image_to_text_R@1"],
           "CIDEr": results["caption"]["CIDEr"]}  # fmt: skip
    if with_vqa:
        out.update(vqa=results["vqa"]["overall"], per_question_type=results["vqa"]["per_question_type"])
    return out


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Train both models for the budget, score them, and return the report and a Markdown table."""
    from mlm.bench.coca import CoCaAdapter
    from mlm.bench.train import _batches

    if args.budget_s <= 0:
        raise ValueError(f"--budget-s {args.budget_s}: must be positive")
    with tempfile.TemporaryDirectory(prefix="mlm-bench-quality-") as tmp:
        config = _config(args, tmp)
        ours, ours_summary = train_ours(config, args.budget_s)
        data = config.data.val or config.data.train
        tokenizer = ours.tokenizer
        _, batches, _ = _batches(config, config.data.train, config.train.batch_size, tmp, tokenizer)
        coca, coca_summary = train_coca(config, tokenizer, batches, args.budget_s, ours.device)
        peer = CoCaAdapter(coca, config.model, tokenizer, config.eval.decoding())
        report = {"config": args.config, "overrides": args.overrides, "budget_s": args.budget_s, "split": args.split,
                  "ours": {"params": sum(p.numel() for p in ours.parameters()), "steps": ours_summary["steps"],
                           **_scores(ours, data, args.split, True, config.eval)},
                  "coca": {"params": sum(p.numel() for p in coca.parameters()), "steps": coca_summary["steps"],
                           **_scores(peer, data, args.split, False, config.eval)}}  # fmt: skip
    report["ratio_t2i_R@1"] = round(report["ours"]["t2i_R@1"] / max(report["coca"]["t2i_R@1"], 1e-9), 3)
    return report, _table(report)


def _table(report: dict) -> str:
    lines = [
        f"quality at {report['budget_s']:g} s of training each, {report['split']} split",
        "| model | params | steps | t2i R@1 | i2t R@1 | CIDEr | VQA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("ours", "ours"), ("coca", "open_clip CoCa")):
        r = report[name]
        vqa = f"{r['vqa']:.1f}" if "vqa" in r else "—"
        lines.append(f"| {label} | {r['params']:,} | {r['steps']} | {r['t2i_R@1']:.1f} | {r['i2t_R@1']:.1f} | "
                     f"{r['CIDEr']:.1f} | {vqa} |")  # fmt: skip
    lines.append(f"ours / CoCa text→image R@1: {report['ratio_t2i_R@1']:.2f}x")
    per_type = report["ours"].get("per_question_type", {})
    if per_type:
        lines.append("ours per question type: " + ", ".join(f"{k} {v:.1f}" for k, v in per_type.items()))
    return "\n".join(lines)
