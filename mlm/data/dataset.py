"""The torch Dataset of image-text records (decode, transform, tokenize each one) and the DataLoader over it.

:class:`ImageTextDataset` turns a source's records into samples ``{image, ids, n_prompt, is_vqa, image_id}``
(caption rows: one caption, a random one in training; VQA rows: ``question: q answer: a``, several questions about
the same image packed together with ``train.vqa_turns`` > 1, see :mod:`mlm.data.turns`; with
``train.swap_negatives`` also swapped-word negative captions, see :mod:`mlm.data.negatives`; with
``train.word_targets: image`` or ``answers`` also ``word_ids``, the tokens the word objective learns for the row's
image, for VQA rows too, see :mod:`mlm.data.word_targets`). ``build_loader`` batches them with
:class:`mlm.data.collate.Collate`.

A record whose image turns out bad when loaded (truncated, corrupt, too large...) is counted in ``dataset.stats``,
logged, and replaced by the next record, so batches keep their size; with ``strict`` it raises instead.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mlm.data import records as R
from mlm.data import turns
from mlm.data.collate import Collate
from mlm.data.images import DEFAULT_MAX_PIXELS, decode_image
from mlm.data.negatives import check_groups, swap_negatives
from mlm.data.records import DataError, Record, SkipStats
from mlm.data.tokenizer import VQA_PROMPT, MLMTokenizer
from mlm.data.word_targets import image_texts, record_texts, resolve_targets

logger = logging.getLogger(__name__)

MAX_LOGGED_SKIPS = 20  # warnings per dataset (per worker); later skips are only counted


class ImageTextDataset(Dataset):
    """Records -> samples ``{image, ids, n_prompt, is_vqa, image_id}``; bad records are skipped and counted."""

    def __init__(
        self,
        source: Sequence[Record],
        tokenizer: MLMTokenizer,
        transform: Callable,
        max_len: int,
        train: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
        max_retries: int = 16,
        swap_groups: list[list[str]] | None = None,
        swap_negatives: int = 0,
        vqa_turns: int = 1,
        vqa_prompt: str = VQA_PROMPT,
        image_words: str | None = None,
        cache_bytes: int = 0,
    ):
        if len(source) == 0:
            raise ValueError(f"data source {getattr(source, 'name', '')!r} has no usable record")
        self.source = source
        self.tokenizer = tokenizer
        self.transform = transform
        self.max_len = max_len
        self.train = train
        self.max_pixels = max_pixels
        self.max_retries = max_retries
        self.stats = SkipStats(strict=strict)
        self.swap_negatives = swap_negatives if train else 0
        self.swap_index = check_groups(swap_groups or []) if self.swap_negatives else {}
        if self.swap_negatives and not self.swap_index:
            raise ValueError(f"train.swap_negatives={swap_negatives} needs data.swap_groups (groups of words to swap)")
        self.vqa_turns = vqa_turns if train else 1
        self.vqa_prompt = vqa_prompt
        # decoded, transformed images by image (records naming one image file share it), while under cache_bytes; only
        # for a transform without randomness, so a cached image is the one decoding would give
        self.pixel_cache = PixelCache(cache_bytes)
        self.same_image = turns.same_image_questions(source) if self.vqa_turns > 1 else {}
        if image_words not in (None, "image", "answers"):
            raise ValueError(f"image_words={image_words!r}: expected None, 'image' or 'answers'")
        self.word_targets = image_words or "caption"
        # token ids of each image's words, tokenized once here rather than for every sample of every epoch
        self.image_words = (
            {key: self._word_ids(texts) for key, texts in image_texts(source, answers=image_words == "answers").items()}
            if image_words
            else None
        )

    def _word_ids(self, texts: list[str]) -> list[int]:
        """The sorted distinct token ids of ``texts``."""
        return sorted({i for text in texts for i in self.tokenizer.tokenize(text)})

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> dict:
        """The sample of one record; raises DataError when its image or text is unusable."""
        record = self.source[index]
        self.stats.read += 1
        if not record.is_vqa and not record.captions:
            raise DataError(R.NO_CAPTION, record.origin, "record has neither captions nor a question")
        key = ("path", str(record.image)) if isinstance(record.image, (str, Path)) else ("record", index)
        pixels = self.pixel_cache.get(key)
        if pixels is None:
            image, notes = decode_image(record.image, self.max_pixels, record.origin)
            for note in notes:
                self.stats.fix(note, record.origin)
            pixels = self.pixel_cache.put(key, self.transform(image))  # (3, H, W)
        targets = None
        if record.is_vqa and self.vqa_turns > 1:
            ids, targets = turns.packed_sample(self, index, record, self.vqa_turns)
            n_prompt = targets.index(True) if True in targets else len(ids)
        elif record.is_vqa:
            answer = turns.answer_of(record)
            ids, n_prompt = self.tokenizer.encode_vqa(record.question, answer, self.max_len, self.vqa_prompt)
        else:
            caption = random.choice(record.captions) if self.train else record.captions[0]
            ids, n_prompt = self.tokenizer.frame(self.tokenizer.tokenize(caption), self.max_len), 0
        sample = {"image": pixels, "ids": ids, "n_prompt": n_prompt, "is_vqa": record.is_vqa,
                  "image_id": record.image_id}  # fmt: skip
        if targets is not None:
            sample["targets"] = targets
        if self.image_words is not None:
            key = turns.image_key(record)
            if key is None:  # an image nothing else names: its own record's words
                sample["word_ids"] = self._word_ids(record_texts(record, answers=self.word_targets == "answers"))
            else:
                sample["word_ids"] = self.image_words.get(key, [])
        if self.swap_negatives:
            texts = [] if record.is_vqa else swap_negatives(caption, self.swap_index, self.swap_negatives, random)
            sample["negatives"] = [self.tokenizer.frame(self.tokenizer.tokenize(t), self.max_len) for t in texts]
        return sample

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.max_retries + 1):
            i = (index + attempt) % len(self.source)
            try:
                return self.load(i)
            except DataError as err:
                self.stats.skip_error(err)  # re-raises under strict
                if sum(self.stats.skipped.values()) <= MAX_LOGGED_SKIPS:
                    logger.warning("skipped a record at load time: %s", err)
        raise ValueError(
            f"records {index}..{i} of {getattr(self.source, 'name', 'the source')} all failed to load; "
            f"skips so far: {dict(self.stats.skipped)}; run `mlm data check` on it"
        )


class PixelCache:
    """Image tensors by key up to a byte budget; once full, later images are not kept (no eviction churn)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes, self.items = max_bytes, 0, {}

    def get(self, key) -> torch.Tensor | None:
        """The tensor stored under key, or None."""
        return self.items.get(key)

    def put(self, key, pixels: torch.Tensor) -> torch.Tensor:
        """Keep pixels under key while they fit the budget; return them."""
        size = pixels.numel() * pixels.element_size()
        if self.bytes + size <= self.max_bytes:
            self.items[key] = pixels
            self.bytes += size
        return pixels


def build_dataset(source: Sequence[Record], tokenizer: MLMTokenizer, cfg, train: bool) -> ImageTextDataset:
    """ImageTextDataset over a source with the transform, text length and image-size guard of a full ``Config``."""
    from mlm.data.transforms import build_transform

    # a training source with no caption learns the words of its answers (``train.word_targets: caption`` otherwise
    # has nothing to learn); the dataset's ``word_targets`` says which words it gives
    targets = cfg.train.word_targets
    if train and cfg.train.word_weight:
        targets = resolve_targets(source, targets)

    return ImageTextDataset(
        source,
        tokenizer,
        build_transform(cfg.model.image_size, train=train, augment=cfg.data.augment),
        max_len=cfg.model.max_text_len,
        train=train,
        max_pixels=cfg.data.max_image_pixels,
        strict=cfg.data.strict,
        swap_groups=cfg.data.swap_groups,
        swap_negatives=cfg.train.swap_negatives,
        vqa_turns=cfg.train.vqa_turns,
        vqa_prompt=cfg.model.vqa_prompt,
        image_words=None if targets == "caption" else targets,
        cache_bytes=image_cache_bytes(cfg, train),
    )


def image_cache_bytes(cfg, train: bool) -> int:
    """data.cache_images_mb in bytes; 0 for a training transform with random augmentation (one info line)."""
    if cfg.data.cache_images_mb <= 0:
        return 0
    if train and cfg.data.augment:
        logger.info("data.cache_images_mb is ignored while data.augment is on (each epoch crops anew)")
        return 0
    if train and cfg.data.num_workers > 0:
        # each worker would fill a copy of its own, and the training loop starts new workers every epoch
        logger.info("data.cache_images_mb is ignored with data.num_workers > 0 (it serves one process)")
        return 0
    return int(cfg.data.cache_images_mb * 2**20)


def build_loader(source: Sequence[Record], tokenizer: MLMTokenizer, cfg, train: bool, batch_size: int | None = None):
    """A DataLoader of batch dicts for a source, sized by a full ``Config`` (model.image_size, data.*, train.*)."""
    dataset = build_dataset(source, tokenizer, cfg, train)
    batch_size = batch_size or (cfg.train.batch_size if train else cfg.eval.batch_size)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        collate_fn=Collate(tokenizer.pad_id),
        generator=generator,
    )
