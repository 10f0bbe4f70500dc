"""Deterministic, resumable data order: per-epoch global batches split across processes, optional grouping of
similar captions into the same batch (hard negatives), and per-sample RNG seeding.

Everything about which records a step sees, and how they are augmented, is a function of (seed, epoch, position),
so a run stopped at step k and resumed draws exactly the batches -- and augmentations -- an uninterrupted run
draws, with or without DataLoader workers.

Grouping similar captions into one batch gives the contrastive loss harder in-batch negatives (Robinson et al.
2021; Radenovic et al. 2023): the first epoch groups by caption overlap (TF-IDF), later epochs by the model's text
embeddings from the end of the previous epoch. It costs O(N D log N) through random-projection-tree bisection
(Dasgupta & Freund 2008, the split rule of Annoy), which varies from epoch to epoch with the seed.
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


def seed_everything(seed: int, cpu_only: bool = False) -> None:
    """Seed Python's, NumPy's and torch's global generators (``cpu_only``: not the accelerators' generators)."""
    random.seed(seed)
    np.random.seed(seed)
    if cpu_only:
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also queues CUDA seeding, ~0.3 ms a call
    else:
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
        seed_everything(seed_for(self.seed, epoch, index), cpu_only=True)
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


@torch.no_grad()
def text_embeddings(
    model, tokenizer, texts: list[str], batch_size: int, max_len: int, device, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """(N, E) float16 embeddings of ``texts`` by ``model.encode_text`` in eval mode (grouping features).

    With ``world`` processes each embeds one share and the shares are all-gathered, so the work is done once, not
    on every process; shares are padded to one length, as FSDP needs every process to run as many forwards.
    """
    share = -(-len(texts) // world)
    mine = texts[rank * share : (rank + 1) * share]
    mine = mine + [texts[-1]] * (share - len(mine))
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(mine), batch_size):
        ids, mask = tokenizer.encode_batch(mine[start : start + batch_size], max_len)
        chunks.append(model.encode_text(ids.to(device), normalize=True, text_mask=mask.to(device)).float())
    model.train(was_training)
    found = torch.cat(chunks)
    if world > 1:
        shares = [torch.empty_like(found) for _ in range(world)]
        torch.distributed.all_gather(shares, found.contiguous())
        found = torch.cat(shares)[: len(texts)]
    return found.cpu().half()  # half: a large dataset's features ride along in every checkpoint


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

    With ``is_vqa`` and ``vqa_fraction`` in [0, 1], every process's batch holds ``round(vqa_fraction * batch_size)``
    VQA records and caption records for the rest (each kind shuffled on its own), so the contrastive loss always
    has the same number of caption rows however the data is mixed; an epoch ends when either kind runs out.
    With ``features`` set (TF-IDF caption vectors or text embeddings), caption records are ordered by similarity
    before cutting, so a batch holds look-alike captions (hard negatives); batch order is then shuffled.
    With ``image_keys`` (one hashable name per record, or None) the VQA rows ask about the images of the batch's
    caption rows, one question record drawn at random per image (``train.vqa_same_images``; the model then encodes
    each image once); an image without questions gets a random VQA record.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        is_vqa: torch.Tensor | None = None,
        vqa_fraction: float = -1.0,
        image_keys: list | None = None,
    ):
        if not (vqa_fraction == -1.0 or 0.0 <= vqa_fraction <= 1.0):
            raise ValueError(f"train.vqa_fraction={vqa_fraction} must lie in [0, 1], or be -1 (records as they come)")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.features: torch.Tensor | None = None
        # Pools of (dataset indices, rows per process batch): one pool, or captions then VQA records.
        self.pools = [(torch.arange(num_items), batch_size)]
        if is_vqa is not None and vqa_fraction >= 0 and 0 < int(is_vqa.sum()) < num_items:
            n_vqa = round(vqa_fraction * batch_size)
            pools = [(torch.nonzero(~is_vqa).flatten(), batch_size - n_vqa), (torch.nonzero(is_vqa).flatten(), n_vqa)]
            self.pools = [(index, rows) for index, rows in pools if rows > 0]
        self.questions: dict[int, list[int]] | None = None  # caption record -> VQA records about its image
        if image_keys is not None and len(self.pools) == 2:
            by_image: dict = {}
            for i in self.pools[1][0].tolist():
                if image_keys[i] is not None:
                    by_image.setdefault(image_keys[i], []).append(i)
            self.questions = {c: by_image.get(image_keys[c], []) for c in self.pools[0][0].tolist()}
        self._len = min(len(index) // (rows * world_size) for index, rows in self.pools[: 1 if self.questions else 2])
        if self._len == 0:
            sizes = ", ".join(f"{len(index)} records for {rows} rows per batch" for index, rows in self.pools)
            raise ValueError(
                f"the training set is smaller than one global batch (train.batch_size={batch_size} x {world_size} "
                f"processes; {sizes}); lower train.batch_size"
            )

    def __len__(self) -> int:
        """Batches per epoch (the incomplete last global batch is dropped)."""
        return self._len

    def set_features(self, features: torch.Tensor | None) -> None:
        """Group similar caption records from now on (None: plain shuffling); ``features`` is (num_items, D)."""
        if features is not None and features.shape[0] != self.num_items:
            raise ValueError(f"features have {features.shape[0]} rows for {self.num_items} items")
        self.features = features

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches (lists of dataset indices) for ``epoch``; the same on every call."""
        generator = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        n, parts = len(self), []
        for pool, (index, rows) in enumerate(self.pools):
            if pool == 1 and self.questions is not None:
                parts.append(self._same_image_questions(parts[0], rows, generator))
                continue
            if pool == 0 and self.features is not None:
                order = index[similarity_order(self.features[index], rows * self.world_size, generator)]
            else:
                order = index[torch.randperm(len(index), generator=generator)]
            parts.append(order[: n * self.world_size * rows].view(n, self.world_size, rows))  # (n, W, rows)
        batches = torch.cat(parts, dim=2)  # (n, W, batch_size)
        if self.features is not None:
            batches = batches[torch.randperm(n, generator=generator)]  # mix the similarity groups across the epoch
        return batches[:, self.rank].tolist()

    def _same_image_questions(self, captions: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
        """(n, W, rows) VQA records about the images of ``captions`` (n, W, caption rows), in their row order."""
        slots = captions[..., torch.arange(rows) % captions.shape[-1]]  # more VQA than caption rows: images again
        draws = torch.randint(2**31 - 1, slots.shape, generator=generator)
        fallback = self.pools[1][0]
        picked = [
            options[d % len(options)] if (options := self.questions[c]) else int(fallback[d % len(fallback)])
            for c, d in zip(slots.flatten().tolist(), draws.flatten().tolist(), strict=True)
        ]
        return torch.tensor(picked, dtype=torch.long).view(slots.shape)

    def keyed_batches(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        """Batches from position ``start`` as ``(epoch, index)`` keys for :class:`SeededItems`."""
        return [[(epoch, i) for i in batch] for batch in self.epoch_batches(epoch)[start:]]
