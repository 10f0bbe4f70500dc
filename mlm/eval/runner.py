"""Model-based evaluation: run a model over a data source and score retrieval, VQA and captioning.

:func:`evaluate` is what ``mlm eval --checkpoint`` and the training loop call. Each task turns the records into
predictions with :mod:`mlm.inference` and scores them with the metric modules beside it:

- retrieval: records are grouped per image, every caption of an image is a positive (the Karpathy-split convention,
  Karpathy & Fei-Fei, 2015); embeddings are computed in batches and similarities in chunks;
- VQA: generative (decode the answer after ``question: <q> answer:``) or rank (the most likely answer of a
  candidate list), scored with the official VQAv2 accuracy (Goyal et al., 2017);
- captioning: one decoded caption per image, scored with pycocoevalcap (Chen et al., 2015).

With ``out_dir`` the predictions are written in the official result formats (so ``mlm eval TASK --predictions``
re-scores them), plus figures, ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mlm import inference as infer
from mlm.config import Config, DataConfig, EvalConfig
from mlm.data.records import Record
from mlm.data.turns import image_key
from mlm.eval.captioning import METRICS
from mlm.eval.image_reliance import reliance, shuffled_partners
from mlm.eval.vqa import normalize_answer, rank_answers, vqa_accuracy
from mlm.model import MLMModel

logger = logging.getLogger(__name__)

TASKS = ("retrieval", "vqa", "caption")
PLOT_QUERIES = 6
TOP_K = 5
FIGURES = (  # (task, file, caption in report.md)
    ("retrieval", "retrieval_text_to_image.png", "Text to image: top-5 images per caption (own image outlined)"),
    ("retrieval", "retrieval_image_to_text.png", "Image to text: top-5 captions per image"),
    ("vqa", "vqa_types.png", "VQA accuracy per answer and question type"),
    ("caption", "caption_examples.png", "Generated captions"),
)


@dataclass
class ImageGroup:
    """One image with all its captions (records of the same image merged)."""

    key: Any  # image id, or the image's name when the source has no ids
    image: Any
    captions: list[str] = field(default_factory=list)


def open_eval_source(spec: str | Path, data: DataConfig | None = None, split: str = "test"):
    """Open a data source for evaluation; split picks the part of a Karpathy file or ``mlm data synth`` folder."""
    from mlm.data.sources import open_source

    source = open_source(str(spec), data or DataConfig(), split)
    if source.stats.skipped:
        logger.warning(
            "%s: skipped %d bad record(s): %s", spec, source.stats.read - source.stats.kept, dict(source.stats.skipped)
        )
    return source


def caption_groups(records: Sequence[Record]) -> list[ImageGroup]:
    """Caption records grouped per image (by id, else by file), captions in order of appearance."""
    groups: dict[Any, ImageGroup] = {}
    for record in records:
        if record.is_vqa or not record.captions:
            continue
        key = record.image_id if record.image_id is not None else record.image_name
        group = groups.setdefault(key, ImageGroup(key, record.image))
        group.captions.extend(record.captions)
    return list(groups.values())


def candidate_list(records: Sequence[Record], top_k: int = 3129) -> list[str]:
    """The rank mode's candidates: the top_k most frequent answers, one spelling per normalised answer.

    Counting is by normalised answer (as the accuracy compares them), but each candidate keeps its most common
    written form ("two", not the normalised "2"), because that is what the model was trained to produce.
    """
    by_norm: dict[str, Counter] = {}
    for record in records:
        for answer in record.answers:
            norm = normalize_answer(answer)
            if norm:
                by_norm.setdefault(norm, Counter())[answer.strip()] += 1
    ranked = sorted(by_norm.values(), key=lambda spellings: -sum(spellings.values()))
    return [spellings.most_common(1)[0][0] for spellings in ranked[:top_k]]


def _limit(items: list, ev: EvalConfig) -> list:
    return items[: ev.max_samples] if ev.max_samples > 0 else items


def _progress(batches, total: int, what: str):
    return tqdm(batches, total=total, desc=what, unit="batch", disable=None, leave=False)


def _n_batches(n: int, ev: EvalConfig) -> int:
    return (n + ev.batch_size - 1) // ev.batch_size


def evaluate_retrieval(model: MLMModel, records: Sequence[Record], ev: EvalConfig, out_dir: Path | None) -> dict:
    """Recall@1/5/10 both ways, mean recall and ranks over the images and captions of the records."""
    from mlm.eval.retrieval import retrieval_metrics, save_embeddings

    groups = _limit(caption_groups(records), ev)
    if not groups:
        raise ValueError("retrieval needs caption records (images with captions); the data has none")
    errors: dict[int, str] = {}
    batches = infer.image_batches([g.image for g in groups], infer.image_transform(model), ev.batch_size, errors=errors)
    image_embeds, kept = [], []
    for index, pixels in _progress(batches, _n_batches(len(groups), ev), "retrieval: images"):
        image_embeds.append(infer.embed_images(model, pixels))
        kept += index
    groups = [groups[i] for i in kept]
    if not groups:
        raise ValueError(f"no image could be decoded, e.g. {next(iter(errors.values()), '')}")
    images = torch.cat(image_embeds)  # (N, E)
    texts = [caption for group in groups for caption in group.captions]
    text_to_image = torch.tensor([i for i, group in enumerate(groups) for _ in group.captions])  # (M,)
    text_embeds = infer.embed_texts(model, texts, ev.batch_size)  # (M, E)
    metrics = retrieval_metrics(images, text_embeds, text_to_image, chunk_size=ev.chunk_size)
    metrics["num_skipped"] = len(errors)
    if out_dir is not None:
        save_embeddings(out_dir / "embeddings.safetensors", images, text_embeds, text_to_image)
        _retrieval_figures(groups, texts, images, text_embeds, text_to_image, out_dir, ev.chunk_size)
    return metrics


def _decoding(model: MLMModel, ev: EvalConfig) -> dict:
    """generate() settings from eval.*; nucleus sampling is seeded so that a report can be reproduced."""
    generator = torch.Generator(device=model.device).manual_seed(0) if ev.top_p > 0 else None
    return {"max_new_tokens": ev.max_new_tokens, "num_beams": ev.num_beams, "top_p": ev.top_p, "generator": generator}


def _query_rows(n: int, count: int = PLOT_QUERIES) -> list[int]:
    """Up to count indices spread evenly over range(n)."""
    count = min(count, n)
    return sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})


class _DisplayImages:
    """Images decoded on access and cropped to a square thumbnail, for figures that show only a few of them."""

    def __init__(self, refs: Sequence[Any], size: int = 128):
        self.refs, self.size = refs, size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int):
        from PIL import ImageOps

        return ImageOps.fit(infer.decode_any(self.refs[index]), (self.size, self.size))


def _retrieval_figures(groups, texts, images, text_embeds, text_to_image, out_dir: Path, chunk: int) -> None:
    """Query grids with the top-5 results, for a few caption queries and a few image queries."""
    from mlm.eval.plots import plot_image_to_text_grid, plot_text_to_image_grid
    from mlm.eval.retrieval import topk_indices

    display = _DisplayImages([g.image for g in groups])
    queries = _query_rows(len(texts))
    top = topk_indices(text_embeds[queries], images, TOP_K, chunk)  # (Q, K)
    targets = [int(text_to_image[q]) for q in queries]
    plot_text_to_image_grid([texts[q] for q in queries], display, top, targets, out_dir / "retrieval_text_to_image.png")
    query_images = _query_rows(len(groups))
    top = topk_indices(images[query_images], text_embeds, TOP_K, chunk)  # (Q, K)
    hits = text_to_image[top] == torch.tensor(query_images)[:, None]  # (Q, K)
    shown = [display[i] for i in query_images]
    plot_image_to_text_grid(shown, texts, top, hits, out_dir / "retrieval_image_to_text.png")


def _vqa_annotation(record: Record, key: Any) -> dict:
    """The official-format annotation of one VQA record."""
    ann = {"question_id": key, "answers": [{"answer": a} for a in record.answers or [record.answer]]}
    if record.answer_type is not None:
        ann["answer_type"] = record.answer_type
    if record.question_type is not None:
        ann["question_type"] = record.question_type
    return ann


def _rank_batch(model: MLMModel, pixels: torch.Tensor, questions: list[str], candidates: Sequence[str]) -> list[str]:
    """The most likely candidate answer for each image (b, 3, H, W) and question."""

    def score(rows: list[int], names: list[str]) -> torch.Tensor:
        return infer.answer_log_likelihood(model, pixels[rows], [questions[r] for r in rows], names)  # (b, C)

    return rank_answers(list(range(len(questions))), candidates, score, batch_size=len(questions))


def _embedding_batch(
    model: MLMModel, pixels: torch.Tensor, questions: list[str], candidates: Sequence[str]
) -> list[str]:
    """No fusion: the candidate whose pooled text (``question: q answer: a`` by default) lies closest to the pooled
    image."""
    from mlm.data.tokenizer import vqa_text

    images = infer.embed_images(model, pixels)  # (b, E)
    pairs = [vqa_text(q, c, model.config.vqa_prompt) for q in questions for c in candidates]
    texts = infer.embed_texts(model, pairs)  # (b*C, E)
    scores = torch.einsum("be,bce->bc", images, texts.view(len(questions), len(candidates), -1))  # (b, C)
    return [candidates[int(i)] for i in scores.argmax(dim=-1)]


def _answer_all(model: MLMModel, questions: list[Record], images: list, ev: EvalConfig, candidates, what="vqa"):
    """(predictions by question key, official annotations, decoding errors) of each question about ``images``."""
    errors: dict[int, str] = {}
    batches = infer.image_batches(images, infer.image_transform(model), ev.batch_size, errors=errors)
    predictions: dict[Any, str] = {}
    annotations: list[dict] = []
    for index, pixels in _progress(batches, _n_batches(len(questions), ev), what):
        texts = [questions[i].question for i in index]
        if ev.vqa_mode == "rank":
            answers = _rank_batch(model, pixels, texts, candidates)
        elif ev.vqa_mode == "embedding":
            answers = _embedding_batch(model, pixels, texts, candidates)
        else:
            answers = model.answer(pixels, texts, **_decoding(model, ev))
        for i, answer in zip(index, answers, strict=True):
            key = questions[i].question_id if questions[i].question_id is not None else i
            predictions[key] = answer
            annotations.append(_vqa_annotation(questions[i], key))
    return predictions, annotations, errors


def evaluate_vqa(
    model: MLMModel,
    records: Sequence[Record],
    ev: EvalConfig,
    out_dir: Path | None,
    candidates: Sequence[str] | None = None,
) -> dict:
    """Official VQAv2 accuracy of generated (``eval.vqa_mode=generative``), ranked (``rank``) or, without the
    cross-modal decoder, embedding-matched (``embedding``) answers."""
    questions = _limit([r for r in records if r.is_vqa], ev)
    if not questions:
        raise ValueError("VQA needs question records (a VQAv2 questions file or a synth folder); the data has none")
    if ev.vqa_mode in ("rank", "embedding"):
        candidates = list(candidates) if candidates else candidate_list(questions)
        logger.info("%s mode: %d candidate answers", ev.vqa_mode, len(candidates))
    predictions, annotations, errors = _answer_all(model, questions, [r.image for r in questions], ev, candidates)
    if not annotations:
        raise ValueError(f"no image could be decoded, e.g. {next(iter(errors.values()), '')}")
    metrics = vqa_accuracy(predictions, annotations)
    metrics.update(mode=ev.vqa_mode, num_skipped=len(errors))
    if ev.vqa_mode != "generative":
        metrics["num_candidates"] = len(candidates)
    if ev.vqa_shuffled:  # the same questions about other images: what the image adds per type
        partners = shuffled_partners([image_key(r) or i for i, r in enumerate(questions)])
        images = [questions[p].image for p in partners]
        shuffled, _, _ = _answer_all(model, questions, images, ev, candidates, "vqa, shuffled images")
        both = [ann for ann in annotations if ann["question_id"] in shuffled]  # both images decoded
        keys = [ann["question_id"] for ann in both]
        own, other = ({k: answers[k] for k in keys} for answers in (predictions, shuffled))
        metrics["shuffled_images"] = reliance(vqa_accuracy(own, both), vqa_accuracy(other, both))
    if out_dir is not None:
        from mlm.eval.plots import plot_vqa_types

        results = [{"question_id": key, "answer": answer} for key, answer in predictions.items()]
        (out_dir / "vqa_results.json").write_text(json.dumps(results, indent=1) + "\n")
        plot_vqa_types(metrics, out_dir / "vqa_types.png")
    return metrics


def evaluate_caption(
    model: MLMModel,
    records: Sequence[Record],
    ev: EvalConfig,
    out_dir: Path | None,
    tokenizer: str = "auto",
    metric_names: Sequence[str] = METRICS,
) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one decoded caption per image against all its references."""
    from mlm.eval.captioning import caption_metrics

    groups = _limit(caption_groups(records), ev)
    if not groups:
        raise ValueError("captioning needs caption records (images with captions); the data has none")
    errors: dict[int, str] = {}
    batches = infer.image_batches([g.image for g in groups], infer.image_transform(model), ev.batch_size, errors=errors)
    decoding = _decoding(model, ev)
    predictions: dict[Any, str] = {}
    for index, pixels in _progress(batches, _n_batches(len(groups), ev), "captions"):
        captions = model.generate(pixels, **decoding)
        predictions.update({groups[i].key: caption for i, caption in zip(index, captions, strict=True)})
    if not predictions:
        raise ValueError(f"no image could be decoded, e.g. {next(iter(errors.values()), '')}")
    references = {g.key: g.captions for g in groups if g.key in predictions}
    metrics = caption_metrics(predictions, references, metrics=metric_names, tokenizer=tokenizer)
    metrics["num_skipped"] = len(errors)
    if out_dir is not None:
        results = [{"image_id": key, "caption": caption} for key, caption in predictions.items()]
        (out_dir / "caption_results.json").write_text(json.dumps(results, indent=1) + "\n")
        shown = [g for g in groups if g.key in predictions][:8]
        _plot_captions(shown, [predictions[g.key] for g in shown], out_dir / "caption_examples.png")
    return metrics


def _plot_captions(groups: list[ImageGroup], captions: list[str], path: Path) -> Path:
    """A row of images, each with its generated caption and first reference caption under it."""
    import textwrap

    from mlm.eval.plots import pyplot, save_figure

    plt = pyplot()
    display = _DisplayImages([g.image for g in groups])
    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 3.6), squeeze=False)
    for ax, group, caption, i in zip(axes[0], groups, captions, range(len(groups)), strict=True):
        ax.imshow(display[i])
        ax.set_xticks([])
        ax.set_yticks([])
        lines = (
            textwrap.wrap(f"model: {caption or '(empty)'}", 32)[:3] + textwrap.wrap(f"ref: {group.captions[0]}", 32)[:3]
        )
        ax.set_xlabel("\n".join(lines), fontsize=7, loc="left")
    return save_figure(fig, plt, path)


def _eval_config(model: MLMModel, cfg: Config | EvalConfig | None) -> EvalConfig:
    if cfg is None:  # the defaults, decoding as the model's saved generation_config
        saved = getattr(model, "generation_config", None)
        return EvalConfig() if saved is None else EvalConfig.from_decoding(saved)
    return cfg.eval if isinstance(cfg, Config) else cfg


def _task_list(task: str | Sequence[str]) -> list[str]:
    """Requested tasks in TASKS order; an empty list means all."""
    names = [t.strip() for item in ([task] if isinstance(task, str) else task) for t in item.split(",") if t.strip()]
    unknown = [t for t in names if t not in (*TASKS, "all")]
    if unknown or not names:
        raise ValueError(f"task {', '.join(unknown) or repr(task)} is not one of {', '.join((*TASKS, 'all'))}")
    return [] if "all" in names else [t for t in TASKS if t in names]


def evaluate(
    model: MLMModel,
    data: str | Path | Sequence[Record],
    task: str | Sequence[str] = "all",
    cfg: Config | EvalConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    split: str = "test",
    candidates: Sequence[str] | None = None,
    caption_tokenizer: str = "auto",
    caption_metric_names: Sequence[str] = METRICS,
    title: str = "",
) -> dict[str, dict]:
    """Evaluate a model on a source spec or records; returns ``{task: metrics}`` for the task(s) run.

    Args:
        model: the bare model (unwrapped from DDP/compile) with its tokenizer; it runs in eval mode and gets its
            previous mode back.
        data: a source spec for :func:`mlm.data.sources.open_source` (opened with ``split``) or records.
        task: ``retrieval``, ``vqa``, ``caption``, a list of them (comma-separated works too), or ``all`` (every
            task the data has records for).
        cfg: evaluation settings (a Config's ``eval`` section or an EvalConfig); default: EvalConfig's, with
            decoding as ``model.generation_config``.
        out_dir: where to write predictions, figures, ``metrics.json`` and ``report.md``; None writes nothing.
        candidates: the rank mode's answer list (default: the answers of the evaluated questions).
        caption_tokenizer: ``auto``, ``ptb`` or ``simple`` (see :func:`mlm.eval.captioning.caption_metrics`).
        caption_metric_names: any of BLEU, METEOR, ROUGE-L, CIDEr (METEOR starts a Java process: slow).
        title: the heading of report.md.
    """
    requested = _task_list(task)
    ev = _eval_config(model, cfg)
    if ev.batch_size < 1 or ev.chunk_size < 1:
        raise ValueError(f"eval.batch_size and eval.chunk_size must be >= 1, got {ev.batch_size}, {ev.chunk_size}")
    records = open_eval_source(data, split=split) if isinstance(data, (str, Path)) else data
    has_vqa = any(r.is_vqa for r in records)
    has_captions = any(not r.is_vqa and r.captions for r in records)
    tasks = requested if requested else [t for t in TASKS if (has_vqa if t == "vqa" else has_captions)]
    if not tasks:
        raise ValueError("the data has neither caption nor question records to evaluate")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    try:
        for name in tasks:
            logger.info("evaluating %s", name)
            if name == "retrieval":
                results[name] = evaluate_retrieval(model, records, ev, out)
            elif name == "vqa":
                results[name] = evaluate_vqa(model, records, ev, out, candidates)
            else:
                results[name] = evaluate_caption(model, records, ev, out, caption_tokenizer, caption_metric_names)
    finally:
        model.train(was_training)
    if out is not None:
        _write(results, out, title or f"Evaluation: {', '.join(tasks)}")
    return results


def _write(results: dict[str, dict], out: Path, title: str) -> None:
    """metrics.json and report.md with the figures that exist."""
    from mlm.eval.report import write_report

    figures = {caption: out / name for task, name, caption in FIGURES if task in results and (out / name).is_file()}
    write_report(results, out, title, figures=figures)
