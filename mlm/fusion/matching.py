"""Image-text matching through the multimodal decoder (ALBEF / BLIP's ITM, Li et al., 2021 and 2022).

Each caption row is read by the decoder three ways, and a two-way head on the decoder's state at the caption's
last real token says "match" or "no match": with its own image (a match); with the image of another row whose
pooled embedding its text is closest to (a hard negative, sampled from the similarities as ALBEF mines them, never
an image of the same picture); and with ``train.swap_negatives``, each of its swapped-word captions with its own
image (a caption wrong in one shape, colour or place word). The contrastive loss compares pooled vectors; this one
asks the decoder, which reads every patch through cross-attention, whether each object the text names is in the
picture -- the judgement an "is there a …?" question needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class MatchPairs:
    """The decoder inputs of one batch's matching pairs: which text states go with which image rows."""

    text_rows: Tensor  # (P,) rows of the batch's text states (negative captions come after the batch's rows)
    image_rows: Tensor  # (P,) rows of the batch's image tokens
    labels: Tensor  # (P,) 1 = the text describes the image, 0 = it does not


class MatchHead(nn.Linear):
    """Two logits (no match, match) from the decoder's normed state at each text's last real token."""

    def __init__(self, dim: int):
        super().__init__(dim, 2)

    def score(self, states: Tensor, mask: Tensor) -> Tensor:
        """Logits (B, 2) of decoder states (B, T, C) at the last True position of the right-padded mask (B, T)."""
        last = mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
        return self(states[torch.arange(states.shape[0], device=states.device), last])


@torch.no_grad()
def hard_images(image_embeds: Tensor, text_embeds: Tensor, rows: Tensor, groups: Tensor) -> Tensor:
    """For each True row of ``rows`` (B,), an image row sampled by softmax(similarity * 10) among the rows whose
    ``groups`` (B,) id differs; -1 where every image of the batch is the row's own picture."""
    picked = torch.nonzero(rows).squeeze(1)  # (R,)
    sims = text_embeds[picked].float() @ image_embeds.float().T  # (R, B)
    other = groups[picked][:, None] != groups[None, :]  # (R, B)
    weights = (sims * 10.0).masked_fill(~other, float("-inf")).softmax(dim=1).nan_to_num(0.0)
    has_other = other.any(dim=1)
    choice = torch.multinomial(weights + (~has_other)[:, None].float(), 1).squeeze(1)  # rows with none: any
    return torch.where(has_other, choice, torch.full_like(choice, -1))


def match_pairs(rows: Tensor, negative_images: Tensor, negative_owner: Tensor | None, batch: int) -> MatchPairs:
    """Positive pairs of the True ``rows``, their hard ``negative_images`` (-1 = none) and the swapped-word
    captions (text rows ``batch + m``) of owners that are True rows."""
    picked = torch.nonzero(rows).squeeze(1)  # (R,)
    keep = negative_images >= 0
    text = [picked, picked[keep]]
    image = [picked, negative_images[keep]]
    if negative_owner is not None and negative_owner.numel():
        own = rows[negative_owner]  # (M,)
        text.append(batch + torch.nonzero(own).squeeze(1))
        image.append(negative_owner[own])
    labels = torch.zeros(sum(t.numel() for t in text), dtype=torch.long, device=rows.device)
    labels[: picked.numel()] = 1
    return MatchPairs(torch.cat(text), torch.cat(image), labels)


def _pad_to(x: Tensor, length: int) -> Tensor:
    """Right-pad (B, T, ...) with zeros (False for masks) along T to ``length``."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def match_logits(model, image, text, text_states, states, mask, negatives, *, rows, groups, negative_owner=None):
    """Matching logits (P, 2) and labels (P,) of one batch, as :class:`MatchPairs` lays them out.

    ``image`` / ``text`` / ``negatives``: the model's Features of the batch's images, texts and swapped-word
    captions (or None); ``text_states`` (B, T, C) the causal text states and ``states`` the decoder's normed states
    of the batch's own pairs (reused for the positives); ``rows`` (B,) the caption rows; ``groups`` (B,) one id per
    picture; ``negative_owner`` (M,) the row of each negative caption.
    """
    batch = text_states.shape[0]
    owner = negative_owner if negatives is not None else None
    pairs = match_pairs(rows, hard_images(image.embeds, text.embeds, rows, groups), owner, batch)
    n_pos = int(rows.sum())
    logits = [model.match_head.score(states[rows], mask[rows])]
    t_rows, i_rows = pairs.text_rows[n_pos:], pairs.image_rows[n_pos:]
    if t_rows.numel():
        all_states, all_mask = text_states, mask
        if negatives is not None:
            length = max(text_states.shape[1], negatives.tokens.shape[1])
            all_states = torch.cat([_pad_to(text_states, length), _pad_to(negatives.tokens, length)])
            all_mask = torch.cat([_pad_to(mask, length), _pad_to(negatives.mask, length)])
        decoded = model._decode(all_states[t_rows], start=0, total_len=all_states.shape[1],
                                context=image.tokens[i_rows], hidden=True)  # fmt: skip
        logits.append(model.match_head.score(decoded, all_mask[t_rows]))
    return torch.cat(logits), pairs.labels


def match_inputs(batch: dict) -> dict:
    """The ``match`` argument of ``MLMModel.forward`` for a training batch: its caption rows, one id per picture
    (from ``image_ids``) and the owners of its swapped-word captions."""
    ids = {image_id: i for i, image_id in enumerate(dict.fromkeys(batch["image_ids"]))}
    groups = torch.tensor([ids[i] for i in batch["image_ids"]], device=batch["is_vqa"].device)
    return {"rows": ~batch["is_vqa"], "groups": groups, "negative_owner": batch.get("negative_owner")}
