"""Image transforms built with timm: a mildly augmented one for training and resize + center crop for evaluation.

Normalisation uses CLIP's mean/std (open_clip's ``OPENAI_DATASET_MEAN``/``STD``; timm ships the same numbers as
``OPENAI_CLIP_MEAN``/``STD`` and importing them from timm avoids loading open_clip). Training crops keep 80-100% of
the image and never flip: captions and questions say "left of" and "top right", which a flip would make false.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.data import create_transform
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TRAIN_SCALE = (0.8, 1.0)
TRAIN_RATIO = (0.9, 1.1)


def build_transform(image_size: int, train: bool = False, augment: bool = True) -> Callable:
    """PIL RGB image -> normalised FloatTensor (3, image_size, image_size); augmented when train and augment."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels")
    if train and augment:
        return create_transform(
            image_size,
            is_training=True,
            scale=TRAIN_SCALE,
            ratio=TRAIN_RATIO,
            hflip=0.0,
            vflip=0.0,
            color_jitter=None,  # colour words are labels here
            interpolation="bicubic",
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
        )
    return create_transform(
        image_size, is_training=False, crop_pct=1.0, interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
    )
