"""Image-text matching through the decoder: hard negatives, pair layout, equivalence with plain forwards, the loss."""

import math

import pytest
import torch

from mlm.config import ConfigError, load_config
from mlm.fusion.matching import hard_images, match_inputs, match_pairs
from mlm.model import MLMModel
from mlm.train.losses import ImageTextLoss, MatchLoss
from tests.test_model import TINY


def model_with_head() -> MLMModel:
    return MLMModel(load_config(None, TINY + ["model.match_head=true"]).model).eval()


def test_hard_images_never_pick_the_same_picture():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = image.clone()  # each text is closest to its own image, the one it may never get
    groups = torch.tensor([0, 0, 1, 1, 2, 3])
    rows = torch.tensor([True, False, True, True, False, True])
    for _ in range(20):
        picked = hard_images(image, text, rows, groups)
        assert picked.shape == (4,)
        assert (groups[picked] != groups[rows]).all()
    alone = hard_images(image[:2], text[:2], torch.tensor([True, True]), torch.tensor([5, 5]))
    assert alone.tolist() == [-1, -1]


def test_pairs_put_positives_first_and_keep_only_negatives_of_caption_rows():
    rows = torch.tensor([True, False, True])
    pairs = match_pairs(rows, torch.tensor([1, -1]), torch.tensor([0, 1, 2, 2]), batch=3)
    assert pairs.text_rows.tolist() == [0, 2, 0, 3, 5, 6]  # negative captions are rows batch + m
    assert pairs.image_rows.tolist() == [0, 2, 1, 0, 2, 2]
    assert pairs.labels.tolist() == [1, 1, 0, 0, 0, 0]


def test_match_logits_equal_plain_forwards_of_each_pair():
    torch.manual_seed(0)
    model = model_with_head()
    images = torch.randn(2, 3, 16, 16)
    ids = torch.randint(4, 48, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    ids[~mask] = 0
    negative = torch.randint(4, 48, (1, 9))  # longer than the batch's texts: padding must not change a score
    match = {"rows": torch.tensor([True, True]), "groups": torch.tensor([0, 1]), "negative_owner": torch.tensor([1])}
    with torch.no_grad():
        out = model(images, ids, mask, negative, torch.ones(1, 9, dtype=torch.bool), match=match)
        assert out.match_labels.tolist() == [1, 1, 0, 0, 0]

        def score(image_rows, text_ids, text_mask):
            o = model(images[image_rows], text_ids, text_mask)
            states = model._decode(model.encoder.encode_text(text_ids).tokens, start=0,
                                   total_len=text_ids.shape[1], context=o.image_tokens, hidden=True)  # fmt: skip
            return model.match_head.score(states, text_mask)

        own = score([0, 1], ids, mask)
        swapped_images = score([1, 0], ids, mask)  # the only other picture is each row's hard negative
        swapped_caption = score([1], negative, torch.ones(1, 9, dtype=torch.bool))
    expected = torch.cat([own, swapped_images, swapped_caption])
    torch.testing.assert_close(out.match_logits, expected, atol=1e-5, rtol=1e-5)


def test_match_loss_is_log_two_at_zero_logits_and_trains_the_head():
    loss = MatchLoss()(torch.zeros(4, 2), torch.tensor([1, 0, 0, 1]))
    assert float(loss) == pytest.approx(math.log(2))
    model = model_with_head().train()
    images = torch.randn(4, 3, 16, 16)
    ids = torch.randint(4, 48, (4, 6))
    batch = {"images": images, "text_ids": ids, "labels": ids.clone(), "is_vqa": torch.tensor([False] * 3 + [True]),
             "image_ids": [7, 8, 9, 7]}  # fmt: skip
    cfg = load_config(None, TINY + ["model.match_head=true", "train.match_weight=1"])
    total, parts = ImageTextLoss.from_config(cfg.train)(model(images, ids, match=match_inputs(batch)), batch)
    total.backward()
    assert parts["match"] > 0
    assert model.match_head.weight.grad.abs().sum() > 0


def test_match_weight_without_the_head_is_refused():
    with pytest.raises(ConfigError, match="train.match_weight=1.0 needs model.match_head"):
        load_config(None, ["train.match_weight=1"])
