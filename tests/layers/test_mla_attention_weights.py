"""Explicit MLA attention weights: they are a distribution over keys and reproduce the module's output."""

import pytest
import torch

from mlm.layers.mla import MultiHeadLatentAttention
from mlm.layers.rope import rope_1d

HEADS, NOPE, ROPE, V, RANK, DIM = 2, 8, 4, 6, 12, 16


def mla(cross: bool) -> MultiHeadLatentAttention:
    return MultiHeadLatentAttention(DIM, HEADS, RANK, NOPE, ROPE, V, q_lora_rank=8, cross=cross).eval()


def output_from_weights(module: MultiHeadLatentAttention, weights: torch.Tensor, keys_from: torch.Tensor):
    """o_proj(weights @ V) with V materialised per head from the keys' latent, as the naive path does."""
    b, s, _ = keys_from.shape
    c_kv, _ = module._latent(keys_from)
    v = module.kv_b_proj(c_kv).view(b, s, HEADS, NOPE + V).transpose(1, 2)[..., NOPE:]  # (B, H, S, V)
    out = (weights @ v).transpose(1, 2).reshape(b, weights.shape[2], HEADS * V)
    return module.o_proj(out)


def test_cross_attention_weights_sum_to_one_and_rebuild_the_output():
    module = mla(cross=True)
    text, image = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    weights = module.attention_weights(text, context=image)
    assert weights.shape == (2, HEADS, 5, 9)
    assert torch.allclose(weights.sum(-1), torch.ones(2, HEADS, 5), atol=1e-6)
    assert bool((weights >= 0).all())
    expected = module(text, context=image)
    assert torch.allclose(output_from_weights(module, weights, image), expected, atol=1e-5)
    # the precomputed image latent gives the same weights as the image tokens
    assert torch.allclose(module.attention_weights(text, context=module.encode_context(image)), weights)
    # and the weights depend on the image: another image moves them
    assert not torch.allclose(module.attention_weights(text, context=torch.randn(2, 9, DIM)), weights, atol=1e-3)


def test_self_attention_weights_respect_the_causal_mask_and_rope():
    module = mla(cross=False)
    x = torch.randn(1, 6, DIM)
    rope = rope_1d(torch.arange(6), ROPE, 10000.0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    weights = module.attention_weights(x, rope=rope, mask=causal)
    assert float(weights.masked_select(~causal).abs().max()) == 0.0
    assert torch.allclose(weights.sum(-1), torch.ones(1, HEADS, 6), atol=1e-6)
    expected = module(x, rope=rope, mask=causal)
    assert torch.allclose(output_from_weights(module, weights, x), expected, atol=1e-5)


def test_attention_weights_check_their_sources():
    with pytest.raises(ValueError, match="needs context="):
        mla(cross=True).attention_weights(torch.randn(1, 2, DIM))
