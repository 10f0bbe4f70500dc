"""Positional keys in cross-attention: every path agrees, positions steer the scores, bad calls are named."""

import pytest
import torch

from mlm.config import MLAConfig
from mlm.layers.mla import build_attention

DIM, TOL = 32, dict(atol=1e-5, rtol=1e-5)
CFG = MLAConfig(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_kv_heads=2)


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_attention(DIM, CFG, kind, cross=True, pos_keys=True).eval()


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa"])
def test_context_encoded_once_absorbed_and_step_by_step_equal_the_raw_forward(kind):
    module = make(kind)
    text, image, pos = torch.randn(2, 6, DIM), torch.randn(2, 9, DIM), torch.randn(1, 9, DIM)
    full = module(text, context=image, context_pos=pos)
    cache = module.encode_context(image, pos)
    stepped = torch.cat([module(text[:, i : i + 1], context=cache) for i in range(6)], dim=1)
    torch.testing.assert_close(stepped, full, **TOL)
    if kind == "mla":
        torch.testing.assert_close(module(text, context=cache, absorbed=True), full, **TOL)
        weights = module.attention_weights(text, context=image, context_pos=pos)  # (B, H, T, S)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6), **TOL)


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_positions_change_the_output_and_their_projection_gets_a_gradient(kind):
    module = make(kind)
    text, image, pos = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM), torch.randn(1, 9, DIM)
    out = module(text, context=image, context_pos=pos)
    moved = module(text, context=image, context_pos=pos.roll(1, dims=1))
    assert not torch.allclose(out, moved)  # the same tokens at other places are attended to differently
    out.sum().backward()
    assert module.pos_key.weight.grad is not None and module.pos_key.weight.grad.abs().sum() > 0


def test_missing_or_misshapen_positions_and_self_attention_are_refused():
    module = make("mla")
    text, image = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    with pytest.raises(ValueError, match="context_pos"):
        module(text, context=image)
    with pytest.raises(ValueError, match=r"do not fit a context of shape \(2, 9, 32\)"):
        module(text, context=image, context_pos=torch.randn(1, 8, DIM))
    with pytest.raises(ValueError, match="pos_keys=True is for cross-attention"):
        build_attention(DIM, CFG, "mla", cross=False, pos_keys=True)
