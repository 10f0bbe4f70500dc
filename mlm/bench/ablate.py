"""``mlm bench ablate``: one table at one wall-clock budget and seed, each row one design switch against the baseline.

Every row trains the config with its ``--set`` switches for ``--budget-s`` seconds: the step count is sized from the
row's own measured step time (a short calibration), so the cosine schedule ends inside the budget, and
``train.max_time_s`` caps it. Then the row is scored by our evaluation code on one split: retrieval both ways, VQA
overall and per question type. Columns are differences to the first row (the baseline), plus parameters and step
time. Rows share the seed and the data order, but a switch changes how the initialisation draws its random numbers
and each row's step count comes from its measured step time, so with one seed a gap of a point or two is noise.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROWS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "the config as it is"),
    "two-tower": (["model.sharing=none"], "separate weights per modality (attention included) instead of shared"),
    "sharing-ffn": (["model.sharing=ffn"], "shared attention, per-modality norms and feed-forward (VLMo)"),
    "mha": (["model.attention=mha"], "multi-head attention instead of MLA"),
    "gqa": (["model.attention=gqa"], "grouped-query attention instead of MLA"),
    "mean-pool": (["model.pooling=mean"], "mean over the last block's tokens instead of hierarchical pooling"),
    "uniform-levels": (["model.level_weight_init=uniform"], "level weights start equal instead of 0.1 → 1.0"),
    "hard-negatives": (
        ["train.hard_negative_strength=0.5", "train.hard_negative_sampler=true"],
        "HN-NCE reweighting and similar-caption batches",
    ),  # fmt: skip
    "top-k": (["model.top_k=8"], "global blocks keep the 8 best keys per query"),
    "no-fusion": (["eval.vqa_mode=embedding"], "VQA answered from pooled embeddings, not the cross-modal decoder"),
    # the shipped tiny config has the two-conv stem (16 and 32 channels, then 7x7 projections at stride 5), so the
    # row puts back the linear patch projection it had before (20 px kernels at stride 10)
    "linear-patches": (
        ["model.conv_stem=0", "model.conv_stem_width=0", "model.patch_overlap=5"],
        "linear overlapping patch projections instead of the 3x3 conv stem (early convolutions)",
    ),
    "swap-negatives": (["train.swap_negatives=4"], "4 captions with one word swapped (data.swap_groups) as negatives"),
    # the shipped tiny config has positional keys on, so the row switches them off
    "no-pos-keys": (
        ["model.cross_pos_keys=false"],
        "cross-attention keys without the patch positions (content only)",
    ),
    # the shipped tiny config packs 5 questions per VQA row, has the per-patch word objective and position values
    # on, so these rows switch one of them off (or the word head to the pooled image); it has no null token
    "one-turn": (["train.vqa_turns=1", "model.max_text_len=40"], "one question per VQA row instead of 5"),
    # word grounding reads the per-patch word head, so these two rows switch it off as well
    "words-pooled": (
        ["model.word_head_patches=false", "model.decoder_grounding=0"],
        "caption words predicted from the pooled image, not per patch (no word grounding)",
    ),
    "no-words": (
        ["model.word_head=false", "model.word_head_patches=false", "train.word_weight=0", "model.decoder_grounding=0"],
        "no word objective (no word grounding)",
    ),
    "null": (["model.cross_null=true"], "a learned null token in the decoder's cross-attention"),
    "no-pos-values": (["model.cross_pos_values=false"], "image tokens the decoder reads without their positions"),
    "no-overlap": (["model.patch_overlap=0"], "patches see only their own pixels (no overlapping patch projection)"),
    "same-images": (
        ["train.vqa_same_images=true"],
        "VQA rows ask about the caption rows' images, so each image is encoded once a step",
    ),
    "compact-prompt": (
        ["model.vqa_prompt={question} [SEP]"],
        "VQA prompts as the question and one [SEP] token instead of question: ... answer:",
    ),
    "match": (  # matching decodes captions without their token ids, which word grounding needs
        ["model.match_head=true", "train.match_weight=1.0", "train.swap_negatives=1", "model.decoder_grounding=0"],
        "the decoder tells matching from hard-negative image-text pairs (ITM; no word grounding)",
    ),
    # the shipped tiny config starts each cross-attention head's queries at a gain of 2, so the row switches it off
    "no-query-gain": (["model.cross_query_gain=0"], "cross-attention queries without their learned per-head gain"),
    "short-conv": (
        ["model.decoder_short_conv=8"],
        "a causal depthwise conv over the last 8 text states at the decoder's input",
    ),
    # the shipped tiny config has 4 word-grounding heads, so the row switches them off
    "no-grounding": (
        ["model.decoder_grounding=0"],
        "the decoder without the heads that read where the per-patch word head sees the recent words",
    ),
    "init-std": (["model.init_std=0.02"], "linear weights ~ truncated normal, std 0.02 (timm / HF) instead of torch's"),
}
QUICK = [  # a model and schedule small enough for the test suite
    "model.dim=32", "model.n_layers=2", "model.levels=[local, global]", "model.image_size=32", "model.patch_size=8",
    "model.max_text_len=24", "model.embed_dim=32", "model.pool_hidden_dim=16", "model.decoder_layers=1",
    "model.mla.n_heads=2", "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
    "model.mla.v_head_dim=8", "data.vocab_size=200", "train.batch_size=8", "train.warmup_steps=2", "eval.batch_size=16",
]  # fmt: skip
SHAPE_TYPE = "what shape is"
POSITION_TYPE = "where is the"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench ablate`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--config", default="configs/tiny-synthetic.yaml", help="the baseline config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every row")  # fmt: skip
    parser.add_argument("--rows", default="all", help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    parser.add_argument("--row", dest="custom", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE]",
                        help="an extra row of your own switches (repeatable)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=120.0, help="training seconds per row (default: 120)")
    parser.add_argument("--data", help="data source for training and scoring (default: the config's data.train, "
                        "scored on data.val)")  # fmt: skip
    parser.add_argument("--split", default="val", help="split scored (default: val)")
    parser.add_argument("--out", help="keep the rows' run folders here (default: a temporary folder, removed)")
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny data, a few steps (for tests)")


def _custom_rows(items: list[str]) -> dict[str, tuple[list[str], str]]:
    """``NAME=KEY=VALUE[;KEY=VALUE]`` rows of the user's own switches."""
    rows = {}
    for item in items:
        name, _, switches = item.partition("=")
        sets = [s.strip() for s in switches.split(";") if s.strip()]
        if not name.strip() or not sets or any("=" not in s for s in sets) or name.strip() in ROWS:
            raise ValueError(f"--row {item}: expected a new NAME=KEY=VALUE[;KEY=VALUE...]")
        rows[name.strip()] = (sets, "custom")
    return rows


def _rows(spec: str, custom: dict) -> list[str]:
    if spec == "all":
        return [*ROWS, *custom]
    names = [n.strip() for n in spec.split(",") if n.strip()] + [n for n in custom if n not in spec.split(",")]
    unknown = [n for n in names if n not in ROWS and n not in custom]
    if unknown or not names:
        raise ValueError(f"--rows {spec}: unknown rows {', '.join(unknown) or '(none)'}; choose from {', '.join(ROWS)}")
    return names if names[0] == "baseline" else ["baseline", *[n for n in names if n != "baseline"]]


def _config(args, data: str, out: Path, switches: list[str], extra: list[str]):
    from mlm.config import load_config

    given = [f"data.train={data}", f"data.val={data}"] if args.data or args.quick else []
    base = [*(QUICK if args.quick else []), *args.overrides, *given]
    fixed = ["train.save_every=0", "train.eval_every=0", "train.trackers=[csv]", f"train.output_dir={out}"]
    return load_config(args.config, [*base, *fixed, *switches, *extra])


def steps_within(step, budget_s: float, warmup: int = 3, timed: int = 8) -> int:
    """How many calls of step() fit the budget, from the median time of ``timed`` calls after ``warmup`` untimed."""
    times = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return max(2, int(budget_s / sorted(times)[len(times) // 2]))


def _calibrated_steps(args, data: str, out: Path, switches: list[str]) -> int:
    """Steps that fit the budget for this row's model, timed on a throwaway trainer."""
    from mlm.train.loop import Trainer

    config = _config(args, data, out / "calibrate", switches, ["train.max_steps=1000000", "train.log_every=1000000"])
    trainer = Trainer(config)
    batches = trainer._micro_batches()
    warmup, timed = (1, 2) if args.quick else (3, 8)
    return steps_within(lambda: trainer.train_step(batches), args.budget_s, warmup, timed)


def _train_row(args, name: str, data: str, out_root: Path):
    """Train one row's switches within the budget; returns (model, summary)."""
    from mlm.train.loop import Trainer

    switches = [s for s in args.table[name][0] if not s.startswith("eval.")]
    steps = _calibrated_steps(args, data, out_root / name, switches)
    config = _config(args, data, out_root / name, switches,
                     [f"train.max_steps={steps}", f"train.max_time_s={args.budget_s}"])  # fmt: skip
    trainer = Trainer(config)
    summary = trainer.fit()
    return trainer.unwrapped, summary


def _score(args, name: str, model, summary: dict, data: str) -> dict:
    """Retrieval and VQA of a trained row, with its evaluation switches (e.g. the VQA mode) applied, checked."""
    from mlm.eval.runner import evaluate

    config = _config(args, data, Path("unused"), args.table[name][0], [])
    results = evaluate(model, config.data.val or data, ["retrieval", "vqa"], config.eval, split=args.split)
    retrieval, vqa = results["retrieval"], results["vqa"]
    return {
        "switches": args.table[name][0],
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": round(summary["time_s"] / max(1, summary["steps"]), 4),
        "steps": summary["steps"],
        "train_s": summary["time_s"],
        "t2i_R@1": retrieval["text_to_image_R@1"],
        "i2t_R@1": retrieval["image_to_text_R@1"],
        "vqa": vqa["overall"],
        "shape": vqa["per_question_type"].get(SHAPE_TYPE),
        "position": vqa["per_question_type"].get(POSITION_TYPE),
        "per_question_type": vqa["per_question_type"],
    }


def _all_rows(args, names: list[str], data: str, out_root: Path) -> dict[str, dict]:
    """Train and score every row; rows that only switch evaluation settings re-score the baseline's model."""
    baseline = _train_row(args, "baseline", data, out_root)
    rows = {}
    for name in names:
        eval_only = all(s.startswith("eval.") for s in args.table[name][0])
        model, summary = baseline if eval_only else _train_row(args, name, data, out_root)
        rows[name] = _score(args, name, model, summary, data)
    return rows


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Train and score each row; return the report and a Markdown table of differences to the baseline."""
    from mlm.data.synthetic import generate

    custom = _custom_rows(args.custom)
    args.table = {**ROWS, **custom}  # the rows this run knows: the built-in ones and the user's
    names = _rows(args.rows, custom)
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s {args.budget_s}: must be positive")
    with tempfile.TemporaryDirectory(prefix="mlm-bench-ablate-") as tmp:
        data = args.data
        if args.quick and not data:
            generate(tmp, n_images=40, size=32, seed=0)
            data = tmp
        if not data:
            from mlm.config import load_config

            data = load_config(args.config, args.overrides).data.train
        for name in names:  # every row's config, evaluation switches included, is checked before any row trains
            _config(args, data, Path(tmp), args.table[name][0], [])
        rows = _all_rows(args, names, data, Path(args.out) if args.out else Path(tmp) / "runs")
    report = {"config": args.config, "overrides": args.overrides, "budget_s": args.budget_s, "split": args.split,
              "data": args.data or "config", "rows": rows}  # fmt: skip
    return report, _table(report)


def _delta(value, base) -> str:
    if value is None or base is None:
        return "—"
    return f"{value - base:+.1f}"


def _value(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _table(report: dict) -> str:
    """Differences to the baseline per row."""
    rows, base = report["rows"], report["rows"]["baseline"]
    lines = [
        f"ablation at {report['budget_s']:g} s of training per row, scored on the {report['split']} split; "
        f"baseline: t2i R@1 {base['t2i_R@1']:.1f}, i2t R@1 {base['i2t_R@1']:.1f}, VQA {base['vqa']:.1f}, "
        f"shape {_value(base['shape'])}, position {_value(base.get('position'))}, "
        f"{base['params']:,} params, {base['step_s']:.3f} s/step",
        "| row | switch | Δ t2i R@1 | Δ i2t R@1 | Δ VQA | Δ shape | Δ position | Δ params | Δ step time | steps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        switch = ", ".join(row["switches"]) or "—"
        step = f"{(row['step_s'] / base['step_s'] - 1) * 100:+.0f}%"
        lines.append(f"| {name} | {switch} | {_delta(row['t2i_R@1'], base['t2i_R@1'])} | "
                     f"{_delta(row['i2t_R@1'], base['i2t_R@1'])} | {_delta(row['vqa'], base['vqa'])} | "
                     f"{_delta(row['shape'], base['shape'])} | {_delta(row.get('position'), base.get('position'))} | "
                     f"{row['params'] - base['params']:+,} | {step} | "
                     f"{row['steps']} |")  # fmt: skip
    return "\n".join(lines)
