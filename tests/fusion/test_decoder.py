"""The multimodal decoder: tied LM head, causality, cross-modal attention and the once-per-image latent."""

import pytest
import torch

from mlm.config import load_config
from mlm.encoders import SharedEncoder
from mlm.fusion.decoder import MultimodalDecoder

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.levels=[local, global]",
    "model.image_size=16",
    "model.patch_size=4",
    "model.vocab_size=30",
    "model.decoder_layers=2",
    "model.mla.n_heads=2",
    "model.mla.kv_lora_rank=16",
    "model.mla.qk_nope_head_dim=8",
    "model.mla.qk_rope_head_dim=8",
    "model.mla.v_head_dim=8",
]


def build(*overrides: str):
    cfg = load_config(None, TINY + list(overrides)).model
    encoder = SharedEncoder(cfg)
    return encoder, MultimodalDecoder(cfg, encoder.token_embed).eval()


def run(encoder, decoder, text_states, image_tokens, **kwargs):
    t = text_states.shape[1]
    rope = encoder.text_rope(0, t, text_states.device)
    mask = encoder.text_mask("global", t, 0, t, text_states.device)
    return decoder(text_states, rope=rope, mask=mask, **kwargs)


def test_lm_head_is_the_token_embedding():
    encoder, decoder = build()
    assert decoder.lm_head.weight is encoder.token_embed.weight
    names = [n for n, _ in torch.nn.ModuleDict({"e": encoder, "d": decoder}).named_parameters()]
    assert "d.lm_head.weight" not in names  # one tensor, listed once


def test_logits_are_causal_and_depend_on_the_image():
    encoder, decoder = build()
    text, image = torch.randn(2, 6, 32), torch.randn(2, 16, 32)
    logits = run(encoder, decoder, text, image, context=image)
    assert logits.shape == (2, 6, 30)
    later = text.clone()
    later[:, 4:] += 1.0
    torch.testing.assert_close(run(encoder, decoder, later, image, context=image)[:, :4], logits[:, :4])
    other_image = run(encoder, decoder, text, image, context=image + 1.0)
    assert not torch.allclose(other_image[:, 0], logits[:, 0])  # cross-attention reaches even the first token


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_precomputed_image_latent_with_the_absorbed_path_equals_the_naive_forward(attention):
    encoder, decoder = build(f"model.attention={attention}")
    text, image = torch.randn(2, 5, 32), torch.randn(2, 16, 32)
    naive = run(encoder, decoder, text, image, context=image)
    cached = run(encoder, decoder, text, image, contexts=decoder.encode_contexts(image), absorbed=True)
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=1e-4)


def test_decoder_needs_exactly_one_kind_of_context():
    encoder, decoder = build()
    text, image = torch.randn(1, 3, 32), torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match="exactly one"):
        run(encoder, decoder, text, image)
    with pytest.raises(ValueError, match="exactly one"):
        run(encoder, decoder, text, image, context=image, contexts=decoder.encode_contexts(image))


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_positional_keys_decoder_paths_agree_and_see_where_patches_are(attention):
    encoder, decoder = build(f"model.attention={attention}", "model.cross_pos_keys=true")
    assert decoder.context_pos.shape == (1, 16, 32)  # the 4x4 patch grid's sin-cos table, not a saved tensor
    assert "context_pos" not in decoder.state_dict()
    text, image = torch.randn(2, 5, 32), torch.randn(2, 16, 32)
    naive = run(encoder, decoder, text, image, context=image)
    cached = run(encoder, decoder, text, image, contexts=decoder.encode_contexts(image), absorbed=True)
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=1e-4)
    # without positional keys the decoder is blind to where a patch lies: permuting patches changes nothing
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(run(encoder, decoder, text, image[:, perm], context=image[:, perm]), naive)
    _, plain = build(f"model.attention={attention}")
    torch.testing.assert_close(
        run(encoder, plain, text, image[:, perm], context=image[:, perm]),
        run(encoder, plain, text, image, context=image), atol=1e-5, rtol=1e-4,
    )  # fmt: skip


def test_the_short_convolution_is_causal_starts_as_the_identity_and_decodes_with_its_history():
    from mlm.fusion.short_conv import ConvHistory, ShortConv

    torch.manual_seed(0)
    conv, x = ShortConv(8, 3), torch.randn(2, 6, 8)
    torch.testing.assert_close(conv(x), x)  # zero weights: no change
    torch.nn.init.normal_(conv.conv.weight)
    full = conv(x)
    torch.testing.assert_close(conv(x[:, :4]), full[:, :4])  # position t sees nothing after t
    w = conv.conv.weight[:, 0]  # (C, 3): the last tap is the token itself
    torch.testing.assert_close(full[:, 3], x[:, 3] + w[:, 0] * x[:, 1] + w[:, 1] * x[:, 2] + w[:, 2] * x[:, 3])
    history = ConvHistory()
    steps = [conv(x[:, :2], history)] + [conv(x[:, t : t + 1], history) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    history.reorder(torch.tensor([1])).expand(2)
    assert history.tail.shape == (2, 2, 8) and torch.equal(history.tail[0], x[1, 4:])
