"""Patch embeddings: the optional convolutional stem, overlapping patches and the absolute image position table."""

import pytest
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from mlm.config import ConfigError, load_config
from mlm.encoders import SharedEncoder
from mlm.encoders.patches import ConvStemPatchEmbed, build_patch_embed, stem_strides
from tests.encoders.test_shared import tiny


def test_conv_stem_downsamples_then_patchifies_to_the_configured_grid():
    stem = build_patch_embed(60, 20, 3, 32, conv_stem=2)
    assert isinstance(stem, ConvStemPatchEmbed)
    assert tuple(stem.grid_size) == (3, 3)  # 60 -> 30 -> 15 -> 5x5 patches -> 3x3
    assert stem(torch.randn(2, 3, 60, 60)).shape == (2, 9, 32)


def test_conv_stem_output_of_a_sample_does_not_depend_on_its_batch():
    stem = build_patch_embed(32, 8, 3, 32, conv_stem=2).train()
    images = torch.randn(4, 3, 32, 32)
    together = stem(images)
    alone = torch.cat([stem(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_conv_stem_strides_halve_while_the_patch_allows_then_keep_the_resolution():
    assert stem_strides(20, 2) == [2, 2] and stem_strides(16, 3) == [2, 2, 2]  # as before: every conv stride 2
    assert stem_strides(10, 2) == [2, 1] and stem_strides(10, 3) == [2, 1, 1] and stem_strides(5, 1) == [1]
    stem = build_patch_embed(60, 10, 3, 128, conv_stem=2, stem_width=32)
    convs = [m for m in stem.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1)] and [c.out_channels for c in convs] == [16, 32]
    assert stem.proj.proj.kernel_size == (5, 5) and tuple(stem.grid_size) == (6, 6)
    assert stem(torch.randn(2, 3, 60, 60)).shape == (2, 36, 128)
    default = build_patch_embed(60, 10, 3, 128, conv_stem=2)  # width 0: the last conv has dim / 2 channels
    assert [m.out_channels for m in default.stem.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 64]


def test_conv_stem_config_is_checked_and_builds_the_encoder():
    cfg = load_config(None, ["model.conv_stem=2", "model.conv_stem_width=16", "model.patch_size=10",
                             "model.image_size=60"]).model  # fmt: skip
    assert tuple(SharedEncoder(cfg).patch_embed.grid_size) == (6, 6)
    with pytest.raises(ConfigError, match="model.conv_stem_width=-1"):
        load_config(None, ["model.conv_stem_width=-1"])
    with pytest.raises(ValueError, match="conv_stem=1 downsamples by 2, which must divide model.image_size=25"):
        build_patch_embed(25, 10, 3, 32, conv_stem=1)


def test_overlapping_patches_keep_the_grid_and_equal_plain_patches_when_the_border_weights_are_zero():
    plain = build_patch_embed(60, 10, 3, 16)
    wide = build_patch_embed(60, 10, 3, 16, overlap=5)
    assert wide.proj.kernel_size == (20, 20) and tuple(wide.grid_size) == (6, 6)
    with torch.no_grad():
        wide.proj.weight.zero_()
        wide.proj.weight[:, :, 5:15, 5:15] = plain.proj.weight
        wide.proj.bias.copy_(plain.proj.bias)
    images = torch.randn(2, 3, 60, 60)
    torch.testing.assert_close(wide(images), plain(images), rtol=1e-5, atol=1e-5)


def test_an_overlapping_patch_sees_its_neighbours_pixels_and_no_further():
    embed = build_patch_embed(40, 10, 3, 8, overlap=3)
    images = torch.zeros(1, 3, 40, 40)
    base = embed(images)[0, 0]  # the top-left patch covers pixels 0..9, and with overlap up to 12
    images[0, :, 12, 12] = 1.0
    assert not torch.allclose(embed(images)[0, 0], base)
    images[0, :, 12, 12], images[0, :, 13, 0] = 0.0, 1.0
    torch.testing.assert_close(embed(images)[0, 0], base)
    conv = build_patch_embed(40, 10, 3, 8, conv_stem=1, overlap=2)
    assert conv.proj.proj.kernel_size == (9, 9) and conv(images).shape == (1, 16, 8)


def test_sincos_positions_are_timm_table_rebuilt_not_stored():
    enc = SharedEncoder(tiny("model.image_pos_embed=sincos"))
    expected = build_sincos2d_pos_embed([4, 4], 32)[None]
    torch.testing.assert_close(enc.pos_embed, expected)
    assert "pos_embed" not in enc.state_dict()
    assert not any(name == "pos_embed" for name, _ in enc.named_parameters())


def test_learned_positions_are_a_parameter_that_trains():
    enc = SharedEncoder(tiny("model.image_pos_embed=learned"))
    assert "pos_embed" in dict(enc.named_parameters())
    enc.encode_image(torch.randn(2, 3, 16, 16)).tokens.sum().backward()
    assert enc.pos_embed.grad is not None and enc.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["none", "sincos", "learned"])
def test_tokens_of_a_uniform_image_know_where_they_are_only_with_a_position_table(kind):
    # Each patch attends only to itself (1x1 local window), so RoPE cannot tell positions apart: only the
    # absolute table makes the states of identical patches differ.
    cfg = tiny(f"model.image_pos_embed={kind}", "model.levels=[local, local, local]", "model.local_window_2d=1")
    enc = SharedEncoder(cfg).eval()
    with torch.no_grad():
        tokens = enc.encode_image(torch.full((1, 3, 16, 16), 0.5)).tokens[0]  # (16, C)
    spread = (tokens - tokens[:1]).abs().max()
    assert (spread > 1e-4) == (kind != "none")


def test_unknown_position_kind_is_refused():
    with pytest.raises(ConfigError, match="model.image_pos_embed='rope'"):
        load_config(None, ["model.image_pos_embed=rope"])


STEM = ["model.conv_stem=2", "model.conv_stem_width=16", "model.patch_overlap=1"]


def test_a_conv_stem_model_saves_quantizes_and_exports_its_image_graph(tmp_path):
    from mlm.compress import int8
    from mlm.model import MLMModel
    from mlm.runtime.graphs import ImageGraph, exportable
    from tests.test_model import tiny_model

    torch.manual_seed(0)
    model = tiny_model(*STEM)  # 16 px images, 4 px patches: strides 2, 2 and a 1 px projection
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        reference = model.image_features(images).embeds
        torch.testing.assert_close(ImageGraph(exportable(model))(images)[0], reference)
        model.save_pretrained(tmp_path / "float")
        torch.testing.assert_close(MLMModel.from_pretrained(str(tmp_path / "float")).image_features(images).embeds,
                                   reference, rtol=0, atol=0)  # fmt: skip
        int8.quantize_int8(model, engine="fbgemm")
        model.save_pretrained(tmp_path / "int8")
        quantized = MLMModel.from_pretrained(str(tmp_path / "int8")).image_features(images).embeds
        torch.testing.assert_close(quantized, model.image_features(images).embeds, rtol=0, atol=0)
    assert torch.nn.functional.cosine_similarity(quantized, reference, dim=-1).min() > 0.98
