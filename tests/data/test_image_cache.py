"""data.cache_images_mb: decoded, transformed images kept in memory when the transform has no randomness."""

import logging

import pytest
import torch

from mlm.config import ConfigError, load_config
from mlm.data import dataset as dataset_module
from mlm.data.dataset import ImageTextDataset, image_cache_bytes
from mlm.data.transforms import build_transform

IMAGE_BYTES = 3 * 32 * 32 * 4


def count_decodes(monkeypatch) -> list:
    calls = []
    real = dataset_module.decode_image

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "decode_image", counted)
    return calls


def test_cached_images_equal_decoded_ones_and_decode_once(synth_source, tok, monkeypatch):
    plain = ImageTextDataset(synth_source, tok, build_transform(32), max_len=64)
    expected = [plain[i]["image"] for i in range(len(synth_source))]
    calls = count_decodes(monkeypatch)
    cached = ImageTextDataset(synth_source, tok, build_transform(32), max_len=64, cache_bytes=1 << 30)
    for _ in range(2):
        for i, image in enumerate(expected):
            assert torch.equal(cached[i]["image"], image)
    files = {r.image for r in synth_source}
    assert len(calls) == len(files) < len(synth_source)  # records about one image file share its entry


def test_cache_stops_at_its_budget(synth_source, tok, monkeypatch):
    calls = count_decodes(monkeypatch)
    cached = ImageTextDataset(synth_source, tok, build_transform(32), max_len=64, cache_bytes=2 * IMAGE_BYTES)
    for _ in range(2):
        for i in range(len(synth_source)):
            cached[i]
    assert cached.pixel_cache.bytes == 2 * IMAGE_BYTES and len(cached.pixel_cache.items) == 2
    kept = {key[1] for key in cached.pixel_cache.items}
    assert len(calls) == 2 * sum(r.image not in kept for r in synth_source) + len(kept)


def test_augmented_training_is_not_cached(caplog):
    config = load_config(None, ["data.cache_images_mb=64", "data.augment=true"])
    with caplog.at_level(logging.INFO):
        assert image_cache_bytes(config, train=True) == 0
    assert "ignored while data.augment is on" in caplog.text
    assert image_cache_bytes(config, train=False) == 64 << 20
    assert image_cache_bytes(load_config(None, ["data.cache_images_mb=64", "data.augment=false"]), True) == 64 << 20
    workers = load_config(None, ["data.cache_images_mb=64", "data.augment=false", "data.num_workers=2"])
    with caplog.at_level(logging.INFO):
        assert image_cache_bytes(workers, train=True) == 0
    assert "ignored with data.num_workers > 0" in caplog.text


def test_negative_budget_is_refused():
    with pytest.raises(ConfigError, match="data.cache_images_mb=-1"):
        load_config(None, ["data.cache_images_mb=-1"])
