"""Resumable data order: shards, determinism, grouping of similar captions, per-sample seeding."""

import random

import pytest
import torch

from mlm.train.sampler import GlobalBatchSampler, SeededItems, caption_features, similarity_order


def test_processes_split_each_global_batch_and_epochs_reshuffle():
    whole = GlobalBatchSampler(50, batch_size=8, seed=3)
    shards = [GlobalBatchSampler(50, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == len(shards[0]) == 6  # 50 // 8, last incomplete global batch dropped
    for epoch in range(2):
        merged = [a + b for a, b in zip(*(s.epoch_batches(epoch) for s in shards), strict=True)]
        assert merged == whole.epoch_batches(epoch)
        flat = [i for batch in merged for i in batch]
        assert len(set(flat)) == len(flat) == 48
    assert whole.epoch_batches(0) != whole.epoch_batches(1)
    assert whole.keyed_batches(1, start=4) == [[(1, i) for i in b] for b in whole.epoch_batches(1)[4:]]


def test_too_small_dataset_names_the_batch_size():
    with pytest.raises(ValueError, match=r"train.batch_size=8 x 2 processes"):
        GlobalBatchSampler(10, batch_size=8, seed=0, world_size=2)


def test_caption_features_weight_shared_rare_words():
    feats = caption_features(["a red cube on the left", "a red cube on the right", "a blue ball above", "the sky"])
    sims = feats @ feats.T
    # Sharing "red cube" counts far more than sharing only a frequent word ("a", "the").
    assert sims[0, 1] > 0.5 > 0.2 > max(sims[0, 2], sims[0, 3])
    torch.testing.assert_close(sims.diagonal(), torch.ones(4))


def test_grouping_puts_similar_items_in_the_same_batch():
    # Four clusters of 16 items; grouped batches of 16 should be far purer than shuffled ones.
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=1)
    labels = torch.arange(64) % 4
    feats = centers[labels] + 0.05 * torch.randn(64, 32, generator=g)
    sampler = GlobalBatchSampler(64, batch_size=16, seed=0)

    def purity(batches):
        return sum(torch.bincount(labels[b], minlength=4).max().item() for b in batches) / 64

    shuffled = sum(purity(sampler.epoch_batches(e)) for e in range(5)) / 5
    sampler.set_features(feats)
    grouped = sum(purity(sampler.epoch_batches(e)) for e in range(5)) / 5
    assert grouped >= 0.85 and shuffled < 0.5
    order = similarity_order(feats, 16, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(64))


class _Noisy:
    def __len__(self):
        return 5

    def __getitem__(self, index):
        return index, random.random(), torch.rand(1).item()


def test_seeded_items_do_not_depend_on_call_order():
    items = SeededItems(_Noisy(), seed=7)
    forward = [items[(0, i)] for i in range(5)]
    backward = [items[(0, i)] for i in reversed(range(5))][::-1]
    assert forward == backward
    assert items[(1, 2)] != items[(0, 2)]  # another epoch draws another augmentation


def test_every_batch_holds_the_configured_share_of_vqa_records():
    is_vqa = torch.tensor([i % 6 != 0 for i in range(60)])  # 10 caption records, 50 VQA records
    sampler = GlobalBatchSampler(60, batch_size=4, seed=0, rank=1, world_size=2, is_vqa=is_vqa, vqa_fraction=0.5)
    assert len(sampler) == 2  # 10 captions / (2 rows x 2 processes)
    for epoch in range(3):
        for batch in sampler.epoch_batches(epoch):
            assert is_vqa[batch].tolist() == [False, False, True, True]
    natural = GlobalBatchSampler(60, batch_size=4, seed=0, is_vqa=is_vqa, vqa_fraction=-1)
    assert len(natural) == 15
    with pytest.raises(ValueError, match="train.vqa_fraction=1.5"):
        GlobalBatchSampler(60, batch_size=4, seed=0, is_vqa=is_vqa, vqa_fraction=1.5)


def test_vqa_rows_can_ask_about_the_caption_rows_images():
    """Records 0-9 are captions of images 0-9; records 10-39 are three questions about each of images 0-8 (image 9
    has none): every VQA row is about the image of the caption row in its slot, or a random question for image 9."""
    is_vqa = torch.tensor([i >= 10 for i in range(40)])
    keys = [f"img{i}" for i in range(10)] + [f"img{(i - 10) // 3}" for i in range(10, 37)] + [None] * 3
    sampler = GlobalBatchSampler(40, batch_size=4, seed=0, rank=1, world_size=2, is_vqa=is_vqa, vqa_fraction=0.5,
                                 image_keys=keys)  # fmt: skip
    assert len(sampler) == 2  # the caption records set the epoch's length
    drawn = set()
    for epoch in range(4):
        batches = sampler.epoch_batches(epoch)
        assert batches == sampler.epoch_batches(epoch)
        for batch in batches:
            assert is_vqa[batch].tolist() == [False, False, True, True]
            for caption, question in zip(batch[:2], batch[2:], strict=True):
                assert keys[question] == keys[caption] or (keys[caption] == "img9" and question >= 10)
            drawn.update(batch[2:])
    assert len(drawn) > 6  # a random question of each image, not always its first
    wider = GlobalBatchSampler(40, batch_size=6, seed=0, is_vqa=is_vqa, vqa_fraction=0.5, image_keys=keys)
    batch = wider.epoch_batches(0)[0]  # three caption and three VQA rows
    assert [keys[i] for i in batch[3:]] == [keys[i] for i in batch[:3]] or "img9" in [keys[i] for i in batch[:3]]


class _CountingEncoder(torch.nn.Module):
    """encode_text stand-in: a fixed function of the ids; counts its calls (FSDP needs equal counts per process)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def encode_text(self, ids, normalize=True, text_mask=None):
        self.calls += 1
        return torch.nn.functional.normalize(torch.stack([ids.float().sum(1), ids.float().max(1).values], 1), dim=-1)


class _Ids:
    """Tokenizer stand-in: a text's character codes, right-padded."""

    def encode_batch(self, texts, max_len):
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = torch.tensor([ord(c) for c in text[:max_len]])
            ids[row, : len(codes)] = codes
        return ids, ids > 0


TEXTS = [f"caption number {i}" for i in range(11)]  # 11: the shares of 2 processes are padded to 6 each


def _share_worker(rank, world_size, init_file, out_file):
    from mlm.train.sampler import text_embeddings

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _CountingEncoder()
        found = text_embeddings(model, _Ids(), TEXTS, 4, 24, torch.device("cpu"), rank, world_size)
        torch.save({"embeddings": found, "calls": model.calls}, f"{out_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_grouping_embeddings_are_shared_out_and_gathered(tmp_path):
    import torch.multiprocessing as mp

    from mlm.train.sampler import text_embeddings

    out = tmp_path / "share"
    mp.start_processes(_share_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    alone = _CountingEncoder()
    expected = text_embeddings(alone, _Ids(), TEXTS, 4, 24, torch.device("cpu"))
    results = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    for result in results:
        assert torch.equal(result["embeddings"], expected)  # every process gets all N, in order
    assert [r["calls"] for r in results] == [2, 2] and alone.calls == 3  # 6 texts each in batches of 4
