"""Swapped-word hard negatives: one word changes, always within its group, deterministically for a seed."""

import random

import pytest

from mlm.data.negatives import check_groups, swap_negatives

GROUPS = [["circle", "square", "star"], ["left", "right"], ["red", "blue"]]


def test_each_negative_differs_in_exactly_one_word_of_a_group():
    index = check_groups(GROUPS)
    caption = "a red circle left of a blue star."
    negatives = swap_negatives(caption, index, 50, random.Random(0))
    # red->blue, circle->2, left->right, blue->red, star->2: 7 distinct single-word swaps
    assert len(negatives) == len(set(negatives)) == 7
    for negative in negatives:
        changed = [(a, b) for a, b in zip(caption.split(), negative.split(), strict=True) if a != b]
        assert len(changed) == 1
        old, new = (w.strip(".") for w in changed[0])
        assert any(old in g and new in g for g in GROUPS)
    assert swap_negatives(caption, index, 3, random.Random(1)) == swap_negatives(caption, index, 3, random.Random(1))
    assert swap_negatives("two objects.", index, 3, random.Random(0)) == []  # nothing to swap


def test_bad_groups_are_named():
    with pytest.raises(ValueError, match=r"swap_groups\[0\]=\['circle'\]: a group needs two or more"):
        check_groups([["circle"]])
    with pytest.raises(ValueError, match="'left' is in more than one group"):
        check_groups([["left", "right"], ["left", "center"]])


def test_the_dataset_and_collate_carry_negatives(tmp_path):
    from mlm.config import load_config
    from mlm.data.collate import Collate
    from mlm.data.dataset import build_dataset
    from mlm.data.sources import open_source
    from mlm.data.synthetic import generate
    from mlm.data.tokenizer import MLMTokenizer

    generate(tmp_path, n_images=12, size=32, seed=0)
    groups = "data.swap_groups=[[circle, square, triangle, diamond, star, cross], [left, right]]"
    config = load_config(None, ["model.image_size=32", "model.patch_size=8", "train.swap_negatives=2", groups])
    source = open_source(str(tmp_path), config.data, "train")
    tokenizer = MLMTokenizer.train_wordpiece(source.texts(), 200)
    dataset = build_dataset(source, tokenizer, config, train=True)
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(s["negatives"] == [] for s in samples if s["is_vqa"])
    assert any(len(s["negatives"]) == 2 for s in samples if not s["is_vqa"])
    batch = Collate(tokenizer.pad_id)(samples)
    owners = batch["negative_owner"]
    assert batch["negative_ids"].shape[0] == owners.numel() == sum(len(s["negatives"]) for s in samples)
    assert not batch["is_vqa"][owners].any()
    with pytest.raises(ValueError, match="train.swap_negatives=2 needs data.swap_groups"):
        build_dataset(source, tokenizer, load_config(None, ["train.swap_negatives=2"]), train=True)


def test_the_article_follows_the_swapped_word():
    index = check_groups([["orange", "red"]])
    assert swap_negatives("an orange star.", index, 1, random.Random(0)) == ["a red star."]
    assert swap_negatives("A red star and a cube.", index, 1, random.Random(0)) == ["An orange star and a cube."]
