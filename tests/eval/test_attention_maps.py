"""Attention maps: pooling weights per level and per-word cross-attention, their sums, words and the PNG."""

import pytest
import torch
from PIL import Image

from mlm import inference as infer
from mlm.config import load_config
from mlm.eval.attention_maps import attention_maps, cross_attention, plot_attention_maps
from mlm.model import MLMModel


def test_maps_cover_each_word_and_each_level_and_sum_to_one(tiny_model, tiny_run, tmp_path):
    image = infer.decode_any(sorted((tiny_run[1] / "images").glob("*.png"))[0])
    pixels = infer.image_transform(tiny_model)(image)[None]
    caption = "a large squarish red circle, top left."
    maps = attention_maps(tiny_model, pixels, caption)
    pieces = tiny_model.tokenizer.tokenize("squarish")
    assert len(pieces) > 1  # a word the vocabulary splits: its sub-words make one map
    assert maps.words == ["a", "large", "squarish", "red", "circle", ",", "top", "left", "."]
    assert maps.word_maps.shape == (9, 4, 4) and sorted(maps.pool) == ["global", "local"]
    assert torch.allclose(maps.word_maps.sum(dim=(1, 2)), torch.ones(9), atol=1e-5)
    pooled = tiny_model.image_features(pixels).pool_weights
    for level, heat in maps.pool.items():
        assert torch.allclose(heat.flatten(), pooled[level][0], atol=1e-6)
    level_weights = tiny_model.pooler.level_weights.tolist()
    assert maps.level_weights == pytest.approx({"local": level_weights[0], "global": level_weights[1]})
    assert not any(layer.cross_attn._forward_pre_hooks for layer in tiny_model.decoder.layers)  # hooks removed
    png = plot_attention_maps(image, maps, tmp_path / "maps.png")
    with Image.open(png) as figure:
        assert figure.format == "PNG" and figure.width > 600


def test_word_map_is_the_attention_of_the_step_that_produces_the_word(tiny_model):
    pixels = torch.randn(1, 3, 32, 32)
    ids = tiny_model.tokenizer.tokenize("red circle")
    assert len(ids) == 2
    maps = attention_maps(tiny_model, pixels, "red circle")
    tokens = tiny_model.encoder.encode_image(pixels).tokens
    text = torch.tensor([[tiny_model.tokenizer.bos_id, *ids]])
    weights = cross_attention(tiny_model, tokens, text)  # (L, 1, H, T, N)
    assert weights.shape[3] == 3
    produced_red = weights[:, 0, :, 0].mean(dim=(0, 1))  # query at BOS predicts "red"
    assert torch.allclose(maps.word_maps[0].flatten(), produced_red, atol=1e-6)


def test_attention_maps_need_mla_and_one_image(tiny_model):
    sets = ["model.attention=gqa", "model.dim=16", "model.n_layers=1", "model.levels=[global]"]
    sets += ["model.image_size=8", "model.patch_size=4", "model.mla.n_kv_heads=1", "model.mla.qk_rope_head_dim=4"]
    gqa = MLMModel(load_config(None, sets).model, tokenizer=tiny_model.tokenizer).eval()
    with pytest.raises(ValueError, match="need model.attention=mla"):
        cross_attention(gqa, torch.randn(1, 4, 16), torch.tensor([[2, 5]]))
    with pytest.raises(ValueError, match="one image"):
        attention_maps(tiny_model, torch.randn(2, 3, 32, 32), "red")
