"""The shared-weight encoder: one set of weights for both modalities, level masks, padding and input checks."""

import pytest
import torch

from mlm.config import load_config
from mlm.encoders import SharedEncoder
from mlm.encoders.block import ffn_hidden_dim
from mlm.encoders.sharing import PerModality, separate_modules

TINY = [
    "model.dim=32",
    "model.n_layers=3",
    "model.levels=[local, regional, global]",
    "model.image_size=16",
    "model.patch_size=4",
    "model.vocab_size=40",
    "model.local_window=2",
    "model.region_size=3",
    "model.mla.n_heads=2",
    "model.mla.kv_lora_rank=16",
    "model.mla.qk_nope_head_dim=8",
    "model.mla.qk_rope_head_dim=8",
    "model.mla.v_head_dim=8",
]


def tiny(*overrides: str):
    return load_config(None, TINY + list(overrides)).model


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_full_sharing_uses_one_parameter_object_that_both_modalities_train():
    enc = SharedEncoder(tiny("model.sharing=full"))
    block = enc.blocks[0]
    for part in (block.attn_norm, block.ffn_norm, block.ffn, enc.norm):
        assert part.get("image") is part.get("text")
    images, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 40, (2, 6))

    enc.encode_image(images).tokens.pow(2).sum().backward()
    from_image = grads(enc)
    enc.zero_grad(set_to_none=True)
    enc.encode_text(ids).tokens.pow(2).sum().backward()
    from_text = grads(enc)
    enc.zero_grad(set_to_none=True)
    (enc.encode_image(images).tokens.pow(2).sum() + enc.encode_text(ids).tokens.pow(2).sum()).backward()
    both = grads(enc)

    shared = [n for n in both if n.startswith("blocks.")]
    assert shared and all(n in from_image and n in from_text for n in shared)
    for name in shared:  # one tensor accumulates both modalities' gradients
        assert from_image[name].abs().sum() > 0 and from_text[name].abs().sum() > 0
        torch.testing.assert_close(both[name], from_image[name] + from_text[name])
    assert "patch_embed.proj.weight" not in from_text and "token_embed.weight" not in from_image


@pytest.mark.parametrize("sharing", ["norms", "ffn"])
def test_partial_sharing_gives_each_modality_its_own_norms_or_experts(sharing):
    enc = SharedEncoder(tiny(f"model.sharing={sharing}"))
    separate_norms, separate_ffn = separate_modules(sharing)
    block = enc.blocks[1]
    assert (block.attn_norm.get("image") is not block.attn_norm.get("text")) == separate_norms
    assert (block.ffn.get("image") is not block.ffn.get("text")) == separate_ffn
    enc.encode_image(torch.randn(2, 3, 16, 16)).tokens.sum().backward()
    image_grads = grads(enc)
    assert "blocks.1.attn.kv_b_proj.weight" in image_grads  # attention stays shared
    assert not any(".experts.text." in n for n in image_grads)  # text copies get nothing from images
    assert any(".experts.image." in n for n in image_grads)


def test_per_modality_rejects_unknown_modalities_and_sharing_values():
    with pytest.raises(ValueError, match="modality='audio'"):
        PerModality(lambda: torch.nn.Identity(), separate=False).get("audio")
    from mlm.config import ConfigError, load_config

    # the allowed values come from the registry that implements them, checked once, in the config
    with pytest.raises(ConfigError, match="model.sharing='half' is not allowed; choose one of full, norms, ffn, none"):
        load_config(None, ["model.sharing=half"])


def test_text_is_causal_and_images_see_every_patch():
    enc = SharedEncoder(tiny()).eval()
    ids = torch.randint(0, 40, (1, 8))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 40
    a, b = enc.encode_text(ids).tokens, enc.encode_text(changed).tokens
    torch.testing.assert_close(a[:, :6], b[:, :6])  # earlier tokens never see later ones
    assert not torch.allclose(a[:, 6:], b[:, 6:])

    images = torch.randn(1, 3, 16, 16)
    other = images.clone()
    other[..., 12:, 12:] += 1.0  # change only the last patch
    x, y = enc.encode_image(images).tokens, enc.encode_image(other).tokens
    assert not torch.allclose(x[:, 0], y[:, 0])  # the first patch sees it through the global block


def test_levels_are_the_normalised_outputs_of_each_levels_last_block():
    enc = SharedEncoder(tiny("model.n_layers=4", "model.levels=[local, global, local, global]")).eval()
    assert enc.level_outputs == {"local": 2, "global": 3}
    out = enc.encode_text(torch.randint(0, 40, (2, 5)))
    assert set(out.levels) == {"local", "global"}
    assert out.levels["global"] is out.tokens
    rms = out.levels["local"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)  # RMSNorm with unit init gain


def test_swiglu_width_keeps_the_mlp_parameter_budget():
    assert ffn_hidden_dim(tiny("model.mlp_ratio=4.0")) == 88  # 2/3 * 4 * 32 = 85.3 -> multiple of 8
    assert ffn_hidden_dim(tiny("model.mlp_ratio=3.0")) == 64


def test_bad_inputs_raise_value_errors_naming_the_setting():
    enc = SharedEncoder(tiny())
    with pytest.raises(ValueError, match="model.image_size"):
        enc.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="model.vocab_size=40"):
        enc.encode_text(torch.tensor([[1, 40]]))
