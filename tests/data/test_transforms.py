"""Transforms: CLIP normalisation, eval resize + centre crop, train crops that never flip."""

import numpy as np
import pytest
import torch
from PIL import Image

from mlm.data.transforms import build_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip's OPENAI_DATASET_STD


def test_eval_normalises_with_clip_mean_std():
    out = build_transform(32)(Image.new("RGB", (48, 48), (255, 0, 128)))
    assert out.shape == (3, 32, 32)
    expected = [(c / 255 - m) / s for c, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(out[:, 16, 16], torch.tensor(expected), atol=1e-3)


def test_eval_resizes_short_side_and_centre_crops():
    img = Image.new("RGB", (96, 48), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 24, 48))  # the left quarter is cropped away
    out = build_transform(16)(img)
    assert out.shape == (3, 16, 16)
    assert out[0].max() < 0  # no white left: the left quarter is outside the centre crop


def test_train_crops_mildly_and_never_flips():
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)  # red on the left, blue on the right
    arr[:, 32:] = (0, 0, 255)
    img = Image.fromarray(arr)
    train = build_transform(64, train=True)
    torch.manual_seed(0)
    for _ in range(20):
        out = train(img)
        assert out.shape == (3, 64, 64)
        assert out[0, :, :8].mean() > out[2, :, :8].mean() and out[2, :, -8:].mean() > out[0, :, -8:].mean()


def test_augment_off_gives_the_eval_transform():
    img = Image.new("RGB", (40, 30), (10, 120, 200))
    assert torch.equal(build_transform(32, train=True, augment=False)(img), build_transform(32)(img))


def test_bad_size_is_explained():
    with pytest.raises(ValueError, match="image_size=0"):
        build_transform(0)


@pytest.mark.slow
def test_constants_equal_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert tuple(OPENAI_DATASET_MEAN) == CLIP_MEAN and tuple(OPENAI_DATASET_STD) == CLIP_STD
