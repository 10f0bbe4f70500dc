"""model.init_std: truncated-normal linear weights, zero biases, deliberate zero inits kept, and the config check."""

import pytest
import torch
from torch import nn

from mlm.config import ConfigError, load_config
from mlm.model import MLMModel

SETTINGS = ["model.dim=32", "model.n_layers=2", "model.levels=[local, global]", "model.image_size=16",
            "model.patch_size=8", "model.vocab_size=50", "model.cross_pos_values=true", "model.early_exit=true",
            "model.exit_lens=true", "model.mla.n_heads=2"]  # fmt: skip


def _same(a: MLMModel, b: MLMModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _model(std: float, seed: int = 0) -> MLMModel:
    torch.manual_seed(seed)
    return MLMModel(load_config(None, [*SETTINGS, f"model.init_std={std}"]).model)


def test_linears_are_drawn_at_the_given_std():
    model, std = _model(0.02), 0.02
    drawn = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.any()]
    weights = torch.cat([m.weight.flatten() for m in drawn])
    assert weights.abs().max() <= 2 * std + 1e-7  # truncated at two standard deviations
    assert weights.std().item() == pytest.approx(std * 0.88, rel=0.05)  # a 2-sigma truncated normal's std
    assert all(m.bias is None or not m.bias.any() for m in drawn)
    # zero on purpose: position values and the exits' lenses; the LM head is still the token embedding
    assert not model.decoder.pos_values.weight.any()
    assert all(not lens.weight.any() for lens in model.early_exit.lenses)
    assert model.decoder.lm_head.weight is model.encoder.token_embed.weight


def test_zero_keeps_torch_defaults_and_seeds_repeat():
    default, other = _model(0.0), _model(0.02)
    torch.manual_seed(0)
    plain = MLMModel(load_config(None, SETTINGS).model)
    assert _same(default, plain)
    # torch's Kaiming-uniform has std 1/sqrt(3 * fan_in): 0.10 at fan_in 32, far from 0.02
    fc = default.decoder.layers[0].cross_attn.o_proj
    assert fc.weight.std().item() == pytest.approx((3 * fc.in_features) ** -0.5, rel=0.1)
    assert _same(other, _model(0.02))


def test_negative_std_is_refused():
    with pytest.raises(ConfigError, match="model.init_std"):
        load_config(None, ["model.init_std=-0.1"])
