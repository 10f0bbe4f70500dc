"""Text rows of very different lengths in two groups, each cut to its own longest row.

A training batch mixes short caption rows with long VQA rows (several turns); padded together, every caption row
pays for the longest VQA row in the text encoder, the decoder and the LM head. The text side is causal, so a row's
padding after its last token changes none of its states: running the short rows cut to their own length computes the
same function for less work. The grouping is chosen by the padded token count it saves.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_SAVING = 0.15  # split only when two groups pad at least this share fewer tokens than one


def row_lengths(mask: Tensor) -> Tensor:
    """Each row's length up to its last kept token (B,), from a (B, T) boolean mask (padding may sit anywhere)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * positions).amax(dim=1).clamp(min=1)


def length_groups(mask: Tensor, min_saving: float = MIN_SAVING) -> list[tuple[Tensor, int]] | None:
    """[(rows, length), (rows, length)]: the longest rows and the rest, each with its group's longest row; the
    split point is the one with the fewest padded tokens. None when one group is within ``min_saving`` of that."""
    lengths = row_lengths(mask).cpu()
    n = lengths.shape[0]
    if n < 2:
        return None
    order = lengths.argsort(descending=True, stable=True)
    ordered = lengths[order]
    split = torch.arange(1, n)
    cost = split * ordered[0] + (n - split) * ordered[1:]  # first `split` rows at the longest, the rest at theirs
    best = int(cost.argmin())
    if cost[best] > (1.0 - min_saving) * n * mask.shape[1]:
        return None
    cut = best + 1
    device = mask.device
    return [(order[:cut].to(device), int(ordered[0])), (order[cut:].to(device), int(ordered[cut]))]


def merge_rows(parts: list[Tensor], groups: list[tuple[Tensor, int]], length: int) -> Tensor:
    """Per-group tensors (b_i, t_i, ...) back into one (B, length, ...) in the batch's row order, zeros as padding."""
    first = parts[0]
    out = first.new_zeros(sum(part.shape[0] for part in parts), length, *first.shape[2:])
    for part, (rows, _) in zip(parts, groups, strict=True):
        out.index_put_((rows[:, None], torch.arange(part.shape[1], device=part.device)), part)
    return out
