"""The fast level paths equal their dense-mask reference: forward and gradients, 1-D and 2-D, ragged sizes."""

import pytest
import torch

from mlm.bench.scale import fit_exponent
from mlm.config import Config
from mlm.encoders.shared import SharedEncoder
from mlm.layers.level_attention import (
    AUTO_MIN_TOKENS,
    LevelPattern,
    RoutedPattern,
    pattern_attend,
    routed_attend,
)
from mlm.layers.sparsity import keep_fraction, routed_count

SIZES = dict(window=3, window_2d=3, region=4, region_2d=2)


def _qkv(n: int, heads_kv: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, heads_kv, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, heads_kv, n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _both(fn, inputs):
    """Output and gradients (of a weighted sum, so every position matters) for the dense and the sparse pattern."""
    results = []
    for impl in ("dense", "sparse"):
        out = fn(impl)
        weights = torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()
        results.append((out, torch.autograd.grad((out * weights).sum(), inputs)))
    return results


def _assert_equal(results):
    (out_d, grads_d), (out_s, grads_s) = results
    torch.testing.assert_close(out_s, out_d, rtol=0, atol=1e-10)
    for gs, gd in zip(grads_s, grads_d, strict=True):
        torch.testing.assert_close(gs, gd, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 5, 16, 37])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("level", "size"), [("local", 0), ("local", 3), ("local", 50), ("regional", 1),
                                             ("regional", 4), ("regional", 50), ("global", 0)])  # fmt: skip
def test_1d_fast_path_equals_dense_mask(n, causal, level, size):
    q, k, v = _qkv(n)
    sizes = {**SIZES, "window": size, "region": max(size, 1)}
    _assert_equal(_both(lambda impl: pattern_attend(q, k, v, LevelPattern(level, n, causal, None, **sizes,
                                                                          impl=impl), 0.3), (q, k, v)))  # fmt: skip


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (6, 6), (7, 4)])
@pytest.mark.parametrize(("level", "size"), [("local", 1), ("local", 3), ("local", 9), ("regional", 1), ("regional", 2),
                                             ("regional", 3), ("regional", 8), ("global", 0)])  # fmt: skip
def test_2d_fast_path_equals_dense_mask(grid, level, size):
    n = grid[0] * grid[1]
    q, k, v = _qkv(n)
    sizes = {**SIZES, "window_2d": max(size, 1), "region_2d": max(size, 1)}
    _assert_equal(_both(lambda impl: pattern_attend(q, k, v, LevelPattern(level, n, False, grid, **sizes,
                                                                          impl=impl), 0.3), (q, k, v)))  # fmt: skip


@pytest.mark.parametrize("heads_kv", [1, 3])
def test_shared_key_head_and_unequal_dims(heads_kv):
    """One key/value head shared by all query heads (absorbed MLA) and Dv < Dk, as MLA runs it."""
    q, k, v = _qkv(40, heads_kv=heads_kv)
    pattern = dict(level="local", n_queries=40, causal=True, grid=None, **SIZES)
    _assert_equal(_both(lambda impl: pattern_attend(q, k, v, LevelPattern(**pattern, impl=impl), 0.3), (q, k, v)))


@pytest.mark.parametrize(("grid", "n"), [(None, 40), (None, 7), ((6, 6), 36), ((5, 7), 35)])
@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("p", [1, 5, 200])
def test_routed_equals_dense_mask_with_gates(grid, n, window, p):
    """Routed keys outside the window carry the router's gate in both paths; the router gets the same gradient."""
    q, k, v = _qkv(n)
    scores = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    sizes = {**SIZES, "window": window, "window_2d": 2 * window + 1}

    def run(impl):
        local = LevelPattern("routed", n, False, grid, **sizes, impl=impl)
        return routed_attend(q, k, v, RoutedPattern(local, scores, min(p, n)), 0.3)

    _assert_equal(_both(run, (q, k, v, scores)))


def test_routed_keys_outside_the_window_change_the_output():
    """A routed key far from a query is seen by it; with p=1 only the top-scoring key is."""
    q, k, v = _qkv(64)
    scores = torch.zeros(2, 64, dtype=torch.float64)
    scores[:, 63] = 5.0  # the last token is routed
    local = LevelPattern("routed", 64, False, None, **SIZES, impl="sparse")
    routed = routed_attend(q, k, v, RoutedPattern(local, scores, 1), 0.3)
    plain = pattern_attend(q, k, v, LevelPattern("local", 64, False, None, **SIZES, impl="sparse"), 0.3)
    assert not torch.allclose(routed[:, :, 0], plain[:, :, 0])  # query 0 sees token 63 only through routing
    torch.testing.assert_close(routed[:, :, 62], plain[:, :, 62])  # token 63 is in query 62's window already


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while fn runs (each storage once)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("grid", [None, (16, 16)])
def test_local_fast_path_keeps_no_scores_for_backward(grid):
    n = 256
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    pattern = LevelPattern("local", n, False, grid, window=16, window_2d=5, region=4, region_2d=2, impl="sparse")
    inputs = 4 * q.numel() * q.element_size()  # q, k, v, the output; log-sum-exps and padding on top
    assert _saved_bytes(lambda: pattern_attend(q, k, v, pattern, 0.3)) < 1.5 * inputs
    # the (n, 3·window) probabilities alone would be 1.5x the inputs


def test_local_fast_path_under_bf16_autocast_trains():
    q, k, v = (torch.randn(1, 2, 300, 8, requires_grad=True) for _ in range(3))
    pattern = LevelPattern("local", 300, True, None, window=16, window_2d=3, region=4, region_2d=2, impl="sparse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pattern_attend(q, k, v, pattern, 0.3)
    out.float().sum().backward()
    reference = pattern_attend(*(x.detach().requires_grad_() for x in (q, k, v)), pattern, 0.3)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in (q, k, v))


def test_length_adaptive_schedule():
    assert keep_fraction(100) == pytest.approx(0.8) and keep_fraction(4096) == pytest.approx(0.2)
    assert 0.2 < keep_fraction(512) < 0.8
    assert routed_count(0, 100) == 80 and routed_count(0, 4096) == 820 and routed_count(64, 4096) == 64
    assert routed_count(500, 36) == 36
    with pytest.raises(ValueError, match="model.routed_tokens=-1"):
        routed_count(-1, 10)


def test_auto_takes_the_fast_path_from_the_threshold_and_not_for_cached_steps():
    small = LevelPattern("local", AUTO_MIN_TOKENS - 1, True, None, **SIZES)
    large = LevelPattern("local", AUTO_MIN_TOKENS, True, None, **SIZES)
    cached = LevelPattern("local", AUTO_MIN_TOKENS, True, None, **SIZES, start=5, impl="sparse")
    assert not small.sparse() and large.sparse() and not cached.sparse()
    assert cached.mask().shape == (AUTO_MIN_TOKENS, AUTO_MIN_TOKENS + 5)


def test_fit_exponent():
    assert fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    assert fit_exponent([256, 1024], [1.0, 4.0]) == pytest.approx(1.0)


def _encoder(impl: str, levels: list[str], attention: str = "mla") -> SharedEncoder:
    cfg = Config().model
    cfg.attention, cfg.mla.n_kv_heads = attention, 1
    cfg.dim, cfg.n_layers, cfg.levels, cfg.image_size, cfg.patch_size = 32, len(levels), levels, 48, 4
    cfg.local_window, cfg.region_size, cfg.routed_tokens, cfg.level_impl = 5, 4, 20, impl
    cfg.mla.n_heads, cfg.mla.kv_lora_rank, cfg.mla.qk_nope_head_dim, cfg.mla.v_head_dim = 2, 16, 8, 8
    torch.manual_seed(0)
    return SharedEncoder(cfg).double()


def test_encoder_sparse_equals_dense_on_images_and_text():
    """The whole encoder (local, regional, routed, global blocks) gives the same states and gradients either way."""
    levels = ["local", "regional", "routed", "global"]
    dense, sparse = _encoder("dense", levels), _encoder("sparse", levels)
    sparse.load_state_dict(dense.state_dict())
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    text = torch.randint(0, 100, (2, 45))
    outs = []
    for enc in (dense, sparse):
        enc.zero_grad()
        img, txt = enc.encode_image(images).tokens, enc.encode_text(text).tokens
        (img.sin().sum() + txt.cos().sum()).backward()
        outs.append((img, txt, [p.grad.clone() for p in enc.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-9)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=1e-9)
    for gs, gd in zip(outs[1][2], outs[0][2], strict=True):
        torch.testing.assert_close(gs, gd, rtol=0, atol=1e-9)
    assert dense.blocks[2].router.weight.grad.abs().sum() > 0  # the router learns from the loss


def test_padded_text_rows_equal_their_unpadded_selves_on_both_paths():
    """Text is causal and padded at the end: a row's real tokens (states and gradients) do not see its pads, on the
    dense and the fast path alike."""
    levels = ["local", "regional", "routed", "global"]
    dense, sparse = _encoder("dense", levels), _encoder("sparse", levels)
    sparse.load_state_dict(dense.state_dict())
    text = torch.randint(1, 100, (2, 45))
    text[1, 30:] = 0  # pads
    real = torch.ones(2, 45, 1, dtype=torch.float64)
    real[1, 30:] = 0
    outs = []
    for enc in (dense, sparse):
        enc.zero_grad()
        txt = enc.encode_text(text).tokens
        (txt.cos() * real).sum().backward()
        with torch.no_grad():
            alone = enc.encode_text(text[1:, :30]).tokens
        torch.testing.assert_close(txt[1:, :30], alone, rtol=0, atol=1e-9)
        outs.append((txt[:, :30], [p.grad.clone() for p in enc.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-9)
    for gs, gd in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(gs, gd, rtol=0, atol=1e-9)


@pytest.mark.parametrize("absorbed", [False, True])
@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_cached_text_decoding_equals_the_full_sparse_pass(absorbed, attention):
    """Step-by-step decoding (local steps read only the cache's last window; the others rows of the cached mask)
    equals one full pass on the fast path."""
    enc = _encoder("sparse", ["local", "regional", "routed", "global"], attention).eval()
    text = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full = enc.encode_text(text).tokens
        caches = enc.new_caches()
        steps = [
            enc.encode_text(text[:, i : i + 1], start=i, total_len=12, caches=caches, absorbed=absorbed).tokens
            for i in range(12)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-9)


def test_a_local_decoding_step_reads_only_the_last_window():
    pattern = LevelPattern("local", 1, True, None, **SIZES, start=20, total=32)
    assert pattern.decode_window() == SIZES["window"] + 1
    assert pattern.mask().shape == (1, 21) and pattern.mask()[0, -4:].all() and not pattern.mask()[0, :-4].any()
    assert LevelPattern("global", 1, True, None, **SIZES, start=20).decode_window() == 0
    assert LevelPattern("local", 1, True, None, **SIZES, start=20, impl="dense").decode_window() == 0


def test_bad_patterns_name_the_problem():
    with pytest.raises(ValueError, match="grid 3x3 has 9 patches but the input has 10 tokens"):
        LevelPattern("local", 10, False, (3, 3), **SIZES)
    with pytest.raises(ValueError, match="model.level_impl='fast' is not one of auto, dense, sparse"):
        LevelPattern("local", 10, False, None, **SIZES, impl="fast")
    with pytest.raises(ValueError, match="attention level 'sliding' is not one of"):
        LevelPattern("sliding", 10, False, None, **SIZES)
