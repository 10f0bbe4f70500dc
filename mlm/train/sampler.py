"""Deterministic, resumable data order: per-epoch global batches split across processes, optional grouping of
similar captions into the same batch (hard negatives), and per-sample RNG seeding.

Everything about which records a step sees, and how they are augmented, is a function of (seed, epoch, position),
so a run stopped at step k and resumed draws exactly the batches -- and augmentations -- an uninterrupted run
draws, with or without DataLoader workers.

Grouping similar captions into one batch gives the contrastive loss harder in-batch negatives (Robinson et al.
2021; Radenovic et al. 2023). It costs O(N D log N) through random-projection-tree bisection (Dasgupta & Freund
2008, the split rule of Annoy), which varies from epoch to epoch with the seed.
"""

from __future__ import annotations

import random
import re
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

_WORD = re.compile(r"[a-z0-9]+")


def seed_for(*values: int) -> int:
    """A 32-bit seed mixed from integers (numpy's SeedSequence: well spread, the same on every platform)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededItems(Dataset):
    """A view of ``dataset`` indexed by ``(epoch, index)`` whose item is drawn with RNGs seeded from both."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # Random augmentation and caption choice depend only on (seed, epoch, index), not on worker or history.
        seed_everything(seed_for(self.seed, epoch, index))
        return self.dataset[index]


def caption_features(texts: list[str], dim: int = 256) -> torch.Tensor:
    """TF-IDF bag-of-words vectors (N, dim), words hashed with CRC32 (stable across processes), L2-normalised."""
    rows, cols = [], []
    for i, text in enumerate(texts):
        for word in set(_WORD.findall(text.lower())):
            rows.append(i)
            cols.append(zlib.crc32(word.encode()) % dim)
    features = torch.zeros(len(texts), dim)
    if rows:
        features.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.ones(len(rows)), accumulate=True)
    df = (features > 0).sum(0).clamp(min=1)  # (dim,) how many texts contain each hashed word
    features = features * torch.log(len(texts) / df + 1.0)
    return torch.nn.functional.normalize(features, dim=1)


def similarity_order(features: torch.Tensor, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of the N rows of ``features`` (N, D) whose consecutive ``group_size`` chunks hold similar rows.

    Random-projection-tree bisection as in Annoy: split a set by the hyperplane between two random members,
    at the median (rounded to whole groups), and recurse until a set is one group.
    """
    groups: list[torch.Tensor] = []
    pending = [torch.randperm(features.shape[0], generator=generator)]
    while pending:
        index = pending.pop()
        if len(index) <= group_size:
            groups.append(index)
            continue
        a, b = torch.randint(len(index), (2,), generator=generator).tolist()
        direction = features[index[a]] - features[index[b]]  # (D,)
        order = index[torch.argsort(features[index].float() @ direction.float(), stable=True)]
        half = max(group_size, round(len(index) / 2 / group_size) * group_size)
        pending += [order[half:], order[:half]]
    return torch.cat(groups)


class GlobalBatchSampler:
    """Per-epoch shuffled global batches of ``batch_size * world_size`` items; each process takes its slice.

    With ``features`` set (captions' TF-IDF vectors or last epoch's text embeddings), items are ordered by
    similarity before cutting, so each batch holds look-alike captions (hard negatives); batch order is shuffled.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise ValueError(
                f"the training set has {num_items} records, fewer than one global batch "
                f"(train.batch_size={batch_size} x {world_size} processes); lower train.batch_size"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.features: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batches per epoch (the incomplete last global batch is dropped)."""
        return self.num_items // (self.batch_size * self.world_size)

    def set_features(self, features: torch.Tensor | None) -> None:
        """Group similar items from now on (None: plain shuffling)."""
        if features is not None and features.shape[0] != self.num_items:
            raise ValueError(f"features have {features.shape[0]} rows for {self.num_items} items")
        self.features = features

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches (lists of dataset indices) for ``epoch``; the same on every call."""
        generator = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        global_batch = self.batch_size * self.world_size
        if self.features is None:
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = similarity_order(self.features, global_batch, generator)
        batches = order[: len(self) * global_batch].view(len(self), global_batch)  # (n_batches, global_batch)
        if self.features is not None:
            batches = batches[torch.randperm(len(self), generator=generator)]  # mix groups across the epoch
        mine = batches[:, self.rank * self.batch_size : (self.rank + 1) * self.batch_size]  # (n_batches, batch)
        return mine.tolist()

    def keyed_batches(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        """Batches from position ``start`` as ``(epoch, index)`` keys for :class:`SeededItems`."""
        return [[(epoch, i) for i in batch] for batch in self.epoch_batches(epoch)[start:]]
