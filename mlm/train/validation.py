"""Periodic validation during training: retrieval R@1 and VQA accuracy on a subset of the validation split.

Metrics come from :mod:`mlm.eval` (Karpathy-protocol recall, the official VQAv2 accuracy); this module only runs
the model over the records: every caption of each image for retrieval, greedy answers for VQA.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable

import torch

from mlm.config import Config
from mlm.data.records import DataError

logger = logging.getLogger(__name__)


class Validator:
    """Holds a validation subset (``eval.max_samples`` caption and VQA records each; 0 = all) and scores a model."""

    def __init__(self, config: Config, source, tokenizer):
        from mlm.data.dataset import build_dataset

        limit = config.eval.max_samples or None
        self.captions = [r for r in source if not r.is_vqa and r.captions][:limit]
        self.questions = [r for r in source if r.is_vqa and r.answers][:limit]
        if not self.captions and not self.questions:
            raise ValueError(f"validation source {getattr(source, 'name', '')!r} has no caption or VQA record")
        self.images = build_dataset(list(self.captions) + list(self.questions), tokenizer, config, train=False)
        self.tokenizer = tokenizer
        self.config = config

    def _pixels(self, index: int) -> torch.Tensor | None:
        try:
            return self.images.load(index)["image"]
        except DataError as err:
            logger.warning("validation: skipped a record: %s", err)
            return None

    def _batches(self, offset: int, count: int):
        """Yield (record indices, images (B, 3, H, W)) over records offset..offset+count-1, bad images left out."""
        size = self.config.eval.batch_size
        for start in range(0, count, size):
            kept, pixels = [], []
            for i in range(start, min(start + size, count)):
                image = self._pixels(offset + i)
                if image is not None:
                    kept.append(i)
                    pixels.append(image)
            if kept:
                yield kept, torch.stack(pixels)

    @torch.no_grad()
    def retrieval(self, model, device: torch.device) -> dict[str, float]:
        """Image->text and text->image recall of the caption records (every caption counts)."""
        from mlm.eval.retrieval import retrieval_metrics

        image_embeds, text_embeds, text_to_image = [], [], []
        max_len = self.config.model.max_text_len
        for kept, images in self._batches(0, len(self.captions)):
            first = sum(e.shape[0] for e in image_embeds)  # index of this batch's first image
            image_embeds.append(model.encode_image(images.to(device), normalize=True).float().cpu())
            captions = [(first + j, text) for j, i in enumerate(kept) for text in self.captions[i].captions]
            ids, mask = self.tokenizer.encode_batch([text for _, text in captions], max_len)
            text_embeds.append(
                model.encode_text(ids.to(device), normalize=True, text_mask=mask.to(device)).float().cpu()
            )
            text_to_image += [image for image, _ in captions]
        if not image_embeds:
            return {}
        metrics = retrieval_metrics(torch.cat(image_embeds), torch.cat(text_embeds), torch.tensor(text_to_image))
        r1 = {k: metrics[f"{k}_R@1"] for k in ("image_to_text", "text_to_image")}
        return {**{f"{k}_R@1": v for k, v in r1.items()}, "R@1": sum(r1.values()) / 2}

    @torch.no_grad()
    def vqa(self, model, device: torch.device) -> dict[str, float]:
        """Official VQA accuracy of greedy answers to the VQA records, overall and per question type
        (``vqa/<type>``, "_" for spaces, when the records have types): when each kind of question is learned."""
        from mlm.eval.vqa import vqa_accuracy

        predictions, annotations = {}, []
        for kept, images in self._batches(len(self.captions), len(self.questions)):
            records = [self.questions[i] for i in kept]
            answers = model.answer(images.to(device), [r.question for r in records],
                                   max_new_tokens=self.config.eval.max_new_tokens, num_beams=1)  # fmt: skip
            for i, record, answer in zip(kept, records, answers, strict=True):
                key = record.question_id if record.question_id is not None else f"q{i}"
                predictions[key] = answer
                annotations.append({"question_id": key, "answers": [{"answer": a} for a in record.answers]})
                if record.question_type:
                    annotations[-1]["question_type"] = record.question_type
        if not annotations:
            return {}
        scores = vqa_accuracy(predictions, annotations)
        # "what shape is" -> vqa/what_shape_is: a metric name that every tracker and the CSV log keep as it is
        per_type = {"vqa/" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"): value
                    for name, value in scores["per_question_type"].items()}  # fmt: skip
        return {"vqa_accuracy": scores["overall"], **per_type}

    def __call__(self, model, device: torch.device, autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
        """All validation metrics (percent), keyed ``val/<name>``; the model is left in training mode."""
        was_training = model.training
        model.eval()
        try:
            with autocast():
                metrics = {**self.retrieval(model, device), **self.vqa(model, device)}
        finally:
            model.train(was_training)
        return {f"val/{k}": float(v) for k, v in metrics.items()}
