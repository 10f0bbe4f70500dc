"""model.cross_query_gain: a learned per-head gain on cross-attention queries scales each head's scores."""

import math

import pytest
import torch

from mlm.config import ConfigError, MLAConfig, load_config
from mlm.layers.mla import build_attention
from mlm.model import MLMModel
from tests.test_model import tiny_model

DIM = 32
CFG = MLAConfig(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_kv_heads=2)


def make(kind: str, gain: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_attention(DIM, CFG, kind, cross=True, gain=gain).eval()


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa"])
def test_a_gain_of_one_changes_nothing_and_a_gain_scales_the_queries(kind):
    text, image = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    plain, one, two = make(kind, 0.0), make(kind, 1.0), make(kind, 2.0)
    assert plain.query_log_gain is None and torch.equal(two.query_log_gain, torch.full((4,), math.log(2.0)))
    with torch.no_grad():
        torch.testing.assert_close(one(text, context=image), plain(text, context=image))
        # the reference: the same module without a gain, its query projection doubled
        proj = plain.q_proj
        proj.weight.mul_(2.0)
        torch.testing.assert_close(two(text, context=image), plain(text, context=image), atol=1e-6, rtol=1e-5)


def test_the_gain_per_head_sharpens_its_weights_and_every_path_agrees():
    module = make("mla", 1.0)
    text, image = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    before = module.attention_weights(text, context=image)
    with torch.no_grad():
        module.query_log_gain[1] = math.log(3.0)  # only head 1 sharpens
    after = module.attention_weights(text, context=image)
    entropy = lambda w: -(w * w.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert entropy(after[:, 1]) < entropy(before[:, 1])
    torch.testing.assert_close(after[:, [0, 2, 3]], before[:, [0, 2, 3]])
    with torch.no_grad():
        full = module(text, context=image)
        torch.testing.assert_close(module(text, context=module.encode_context(image), absorbed=True), full,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    module.train()
    module(text, context=image).sum().backward()
    assert module.query_log_gain.grad is not None and module.query_log_gain.grad.abs().sum() > 0


def test_bad_gains_are_refused():
    with pytest.raises(ValueError, match="gain > 0 on the queries of a cross-attention module"):
        build_attention(DIM, CFG, "mla", cross=False, gain=2.0)
    with pytest.raises(ConfigError, match="model.cross_query_gain"):
        load_config(None, ["model.cross_query_gain=-1"])


def test_learned_gains_survive_save_and_load(tmp_path):
    model = tiny_model("model.cross_query_gain=2.0")
    with torch.no_grad():
        model.decoder.layers[0].cross_attn.query_log_gain.add_(torch.arange(4.0)[: model.config.mla.n_heads])
    model.save_pretrained(tmp_path)
    loaded = MLMModel.from_pretrained(tmp_path)
    for a, b in zip(model.decoder.layers, loaded.decoder.layers, strict=True):
        assert torch.equal(a.cross_attn.query_log_gain, b.cross_attn.query_log_gain)
