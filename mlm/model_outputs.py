"""What the model's passes return: :class:`MLMOutput` (a training forward), :class:`Features` (one modality after the
encoder and pooling), the text-mask check they share, and :func:`unique_images`, which lets a batch that holds an
image twice (a caption row and a VQA row about it, ``train.vqa_same_images``) encode it once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MLMOutput:
    """What :meth:`MLMModel.forward` returns (the training loss computes its objectives from these)."""

    image_embeds: Tensor | None = None  # (B, E) L2-normalised
    text_embeds: Tensor | None = None  # (B, E) L2-normalised
    logit_scale: Tensor | None = None  # scalar, exp'ed and clamped to <= 100
    logit_bias: Tensor | None = None  # scalar, for the SigLIP loss
    logits: Tensor | None = None  # (B, T, V): position t predicts token t + 1
    image_tokens: Tensor | None = None  # (B, N, C) final image states read by the decoder
    negative_embeds: Tensor | None = None  # (M, E) L2-normalised swapped-word negative captions, when given
    word_logits: Tensor | None = None  # (B, V) the caption words predicted from each image, with model.word_head
    match_logits: Tensor | None = None  # (P, 2) no match / match of image-text pairs, with model.match_head
    match_labels: Tensor | None = None  # (P,) 1 where the pair matches
    exit_embeds: Tensor | None = None  # (X, B, E) the images' embeddings at each early exit, with model.early_exit
    exit_logits: Tensor | None = None  # (X, B) the halting gates' logits at each exit
    exit_lens: Tensor | None = None  # scalar: the exit lenses' relative error to the final states, model.exit_lens


@dataclass
class Features:
    """One modality after the encoder and pooling."""

    embeds: Tensor  # (B, E) L2-normalised embeddings in the shared space
    tokens: Tensor  # (B, T, C) final encoder states
    pool_weights: dict[str, Tensor]  # level -> (B, T) softmax pooling weights over positions
    projected: Tensor | None = None  # (B, E) the embeddings before L2 normalisation
    mask: Tensor | None = None  # (B, T) True at real tokens (text)
    exits: list | None = None  # training with model.early_exit: [exit embeds, gate logits, lens loss or None]

    def take(self, rows: Tensor) -> Features:
        """These features for the rows ``rows`` (B',) of the batch (gradients flow back to the rows taken)."""
        exits = None
        if self.exits is not None:  # (X, B, E), (X, B), and a relative error that repeating rows leaves unchanged
            exits = [self.exits[0][:, rows], self.exits[1][:, rows], *self.exits[2:]]
        return Features(
            self.embeds[rows], self.tokens[rows], {k: v[rows] for k, v in self.pool_weights.items()},
            None if self.projected is None else self.projected[rows], None if self.mask is None else self.mask[rows],
            exits,
        )  # fmt: skip


def unique_images(images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(distinct images (U, ...), each row's index into them (B,)), or (images, None) when no two rows are equal."""
    if images.shape[0] < 2 or images.requires_grad:  # torch.unique has no gradient to the pixels
        return images, None
    flat = images.flatten(1)
    if torch.unique(flat.sum(dim=1)).numel() == images.shape[0]:  # cheap: distinct sums, distinct images
        return images, None
    distinct, rows = torch.unique(flat, dim=0, return_inverse=True)
    if distinct.shape[0] == images.shape[0]:
        return images, None
    return distinct.view(-1, *images.shape[1:]), rows


def check_text_mask(text_ids: Tensor, text_mask: Tensor | None) -> Tensor:
    """Return a boolean (B, T) mask (all True when None); raise ValueError unless text is right-padded."""
    if text_mask is None:
        return torch.ones_like(text_ids, dtype=torch.bool)
    if text_mask.shape != text_ids.shape:
        raise ValueError(f"text_mask has shape {tuple(text_mask.shape)} but text_ids {tuple(text_ids.shape)}")
    text_mask = text_mask.bool()
    if bool((text_mask[:, 1:] & ~text_mask[:, :-1]).any()):
        raise ValueError("text must be right-padded: text_mask has a real token after a pad in some row")
    return text_mask
