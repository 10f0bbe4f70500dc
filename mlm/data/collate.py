"""The collate function: samples of :class:`mlm.data.dataset.ImageTextDataset` stacked into one batch dict.

The batch dict (the contract with ``MLMModel.forward`` and the training loop):

- ``images``: FloatTensor (B, 3, H, W), CLIP-normalised;
- ``text_ids``: LongTensor (B, T), ``[BOS] tokens [EOS]`` then ``[PAD]``; VQA rows hold ``question: q answer: a``;
- ``text_mask``: BoolTensor (B, T), True at real tokens;
- ``labels``: LongTensor (B, T), ``text_ids`` with ``IGNORE_INDEX`` (-100) at pads and, for VQA rows, at every
  prompt token up to and including "answer:" (the model shifts them: logits at t predict labels at t+1); with
  ``train.vqa_turns`` > 1 a VQA row packs several questions about its image (:mod:`mlm.data.turns`) and only
  answers are targets;
- ``is_vqa``: BoolTensor (B,); ``image_ids``: list of image ids;
- with swapped-word hard negatives (``train.swap_negatives``, :mod:`mlm.data.negatives`): ``negative_ids`` and
  ``negative_mask`` (M, T') for the M negative captions of the batch and ``negative_owner`` (M,), the row each
  belongs to;
- with ``train.word_targets: image``: ``word_ids`` (B, W), each row's image's caption tokens, ``pad_id`` after them
  (a row whose image has no caption holds only pads).

``IGNORE_INDEX`` is defined here once; the token cross-entropy of :mod:`mlm.train.losses` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Collate:
    """Stacks samples into the batch dict (picklable, so DataLoader workers can use it)."""

    pad_id: int

    def __call__(self, samples: list[dict]) -> dict:
        images = torch.stack([s["image"] for s in samples])  # (B, 3, H, W)
        text_ids, text_mask = self.pad([s["ids"] for s in samples])  # (B, T)
        labels = text_ids.masked_fill(~text_mask, IGNORE_INDEX)  # (B, T)
        for row, s in enumerate(samples):
            labels[row, : s["n_prompt"]] = IGNORE_INDEX  # the question is context, not a target
            if "targets" in s:  # packed turns: every later question is context too
                labels[row, : len(s["ids"])].masked_fill_(~torch.tensor(s["targets"]), IGNORE_INDEX)
        batch = {
            "images": images,
            "text_ids": text_ids,
            "text_mask": text_mask,
            "labels": labels,
            "is_vqa": torch.tensor([s["is_vqa"] for s in samples], dtype=torch.bool),  # (B,)
            "image_ids": [s["image_id"] for s in samples],
        }
        if "word_ids" in samples[0]:
            batch["word_ids"] = self.pad([s["word_ids"] for s in samples])[0]  # (B, W)
        if any("negatives" in s for s in samples):
            negatives = [(row, ids) for row, s in enumerate(samples) for ids in s.get("negatives", [])]
            batch["negative_ids"], batch["negative_mask"] = self.pad([ids for _, ids in negatives])  # (M, T')
            batch["negative_owner"] = torch.tensor([row for row, _ in negatives], dtype=torch.long)  # (M,)
        return batch

    def pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Id lists as a (N, L) LongTensor padded with ``pad_id`` (L = the longest, at least 1) and its mask."""
        ids = torch.full((len(seqs), max((len(s) for s in seqs), default=1) or 1), self.pad_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return ids, mask
