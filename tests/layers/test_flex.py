"""The FlexAttention levels equal their dense-mask reference; on the CPU they refuse to train, in one line."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from mlm.layers import flex, level_attention
from mlm.layers.attention import sdpa
from mlm.layers.flex import flex_attend
from mlm.layers.level_attention import LevelPattern
from tests.layers.test_level_attention import _encoder

CASES = [  # (level, grid, causal, tokens, key heads of the 4 query heads: 1 as absorbed MLA, 2 as GQA, 4 as MHA)
    ("local", None, False, 150, 1),
    ("local", None, True, 150, 2),
    ("regional", None, False, 150, 4),
    ("regional", None, True, 37, 1),
    ("global", None, True, 150, 2),
    ("global", None, False, 20, 4),
    ("routed", None, False, 40, 2),  # without router scores: its local part
    ("local", (6, 7), False, 42, 1),
    ("local", (3, 5), False, 15, 4),
    ("regional", (6, 7), False, 42, 2),
    ("regional", (4, 4), False, 16, 1),
]


@pytest.fixture(autouse=True)
def _unfused_is_expected():
    with warnings.catch_warnings():  # the eager reference warns that it is not the fused kernel
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.mark.parametrize(("level", "grid", "causal", "n", "heads_kv"), CASES)
def test_flex_equals_dense_mask(level, grid, causal, n, heads_kv):
    """Every level's predicate states its dense mask: same output, with shared key heads and a narrower value."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 4, n, 24, generator=g)
    k, v = torch.randn(2, heads_kv, n, 24, generator=g), torch.randn(2, heads_kv, n, 16, generator=g)
    pattern = LevelPattern(level, n, causal, grid, window=5, window_2d=3, region=7, region_2d=2, impl="flex")
    out = flex_attend(q, k, v, pattern, 0.2, compiled=False)
    reps = 4 // heads_kv
    ref = sdpa(q, k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1), pattern.mask(), 0.2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_the_cpu_refuses_to_train_on_flex_in_one_line():
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    pattern = LevelPattern("local", 8, False, None, window=2, window_2d=3, region=4, region_2d=2, impl="flex")
    with pytest.raises(ValueError, match=r"model.level_impl=flex: .* no FlexAttention backward on the CPU"):
        flex_attend(q, q, q, pattern, 1.0, compiled=False)
    with torch.no_grad():
        assert flex_attend(q, q, q, pattern, 1.0, compiled=False).shape == (1, 2, 8, 8)


def test_encoder_on_flex_equals_dense_for_inference(monkeypatch):
    """level_impl=flex reaches every block (routed ones keep their blocked path); cached decoding steps read the
    dense rows. The unfused reference stands in for the compiled kernel (compiled: the slow test below)."""
    monkeypatch.setattr(flex, "_compiled", lambda: flex_attention)
    calls = []
    monkeypatch.setattr(level_attention, "flex_attend", lambda *a: calls.append(a[3].level) or flex_attend(*a))
    levels = ["local", "regional", "routed", "global"]
    dense, fast = _encoder("dense", levels).float(), _encoder("flex", levels).float()
    fast.load_state_dict(dense.state_dict())
    images, text = torch.randn(2, 3, 48, 48), torch.randint(0, 100, (2, 45))
    with torch.no_grad():
        for enc_out in (lambda e: e.encode_image(images).tokens, lambda e: e.encode_text(text).tokens):
            torch.testing.assert_close(enc_out(fast), enc_out(dense), rtol=0, atol=1e-5)
    assert set(calls) == {"local", "regional", "global"}  # every block but the routed one ran on FlexAttention


@pytest.mark.slow
@pytest.mark.parametrize(("level", "grid", "causal", "n", "heads_kv"), [
    ("local", None, False, 1024, 1), ("regional", None, True, 600, 2), ("local", (20, 30), False, 600, 4),
    ("regional", (24, 24), False, 576, 1),
])  # fmt: skip
def test_compiled_flex_equals_dense_mask_at_length(level, grid, causal, n, heads_kv):
    """The compiled kernel (torch.compile on the CPU: tens of seconds a shape), which skips the masked blocks."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, 4, n, 32, generator=g)
    k, v = torch.randn(1, heads_kv, n, 32, generator=g), torch.randn(1, heads_kv, n, 16, generator=g)
    pattern = LevelPattern(level, n, causal, grid, window=64, window_2d=7, region=64, region_2d=8, impl="flex")
    with torch.no_grad():
        out = flex_attend(q, k, v, pattern, 32**-0.5)
    reps = 4 // heads_kv
    ref = sdpa(q, k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1), pattern.mask(), 32**-0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_trains_on_cuda_like_the_dense_mask():
    """On CUDA FlexAttention has a backward: output and gradients equal the dense mask's."""
    n = 512
    q, k, v = (torch.randn(1, 4, n, 32, device="cuda", requires_grad=True) for _ in range(3))
    pattern = LevelPattern("local", n, True, None, window=64, window_2d=3, region=64, region_2d=8, impl="flex")
    results = []
    for run in (lambda: flex_attend(q, k, v, pattern, 32**-0.5), lambda: sdpa(q, k, v, pattern.mask("cuda"), 32**-0.5)):
        out = run()
        results.append((out, torch.autograd.grad(out.sin().sum(), (q, k, v))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_block_masks_are_shared_by_patterns_of_one_mask_and_export_takes_the_default_path(monkeypatch):
    """Settings a mask does not depend on (total, impl, another level's sizes) share one block mask; an exported
    graph (ONNX) never meets FlexAttention."""
    sizes = dict(window=2, window_2d=3, region=4, region_2d=2)
    one = LevelPattern("local", 16, True, None, **sizes, impl="flex")
    same = LevelPattern("local", 16, True, None, **{**sizes, "region": 8}, impl="flex", total=40)
    assert flex.block_mask(one, "cpu") is flex.block_mask(same, "cpu")
    assert flex.block_mask(one, "cpu") is not flex.block_mask(LevelPattern("local", 16, False, None, **sizes), "cpu")

    def refuse(*args):
        raise AssertionError("FlexAttention while exporting")

    monkeypatch.setattr(level_attention, "flex_attend", refuse)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    q = torch.randn(1, 2, 16, 8)
    out = level_attention.pattern_attend(q, q, q, one, 0.5)
    torch.testing.assert_close(out, sdpa(q, q, q, one.mask(), 0.5), rtol=0, atol=1e-6)
