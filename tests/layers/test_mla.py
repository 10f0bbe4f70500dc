"""Tests for MLA (naive vs absorbed, cached decoding, cross-attention) and the MHA/GQA baselines."""

import copy

import pytest
import torch

from mlm.config import MLAConfig
from mlm.layers.masks import level_mask
from mlm.layers.mla import (
    GroupedQueryAttention,
    KVCache,
    LatentKVCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    build_attention,
)
from mlm.layers.rope import rope_1d

DIM, HEADS, KV_RANK, NOPE, ROPE, V = 32, 4, 16, 8, 4, 6
TOL = dict(atol=1e-5, rtol=1e-5)


def make(kind: str, cross: bool = False, q_lora_rank: int = 0) -> torch.nn.Module:
    """A tiny attention module with random (not unit) norm weights, so a skipped norm would show."""
    if kind == "mla":
        module = MultiHeadLatentAttention(DIM, HEADS, KV_RANK, NOPE, ROPE, V, q_lora_rank=q_lora_rank, cross=cross)
    elif kind == "gqa":
        module = GroupedQueryAttention(DIM, HEADS, 2, NOPE, ROPE, V, cross=cross)
    else:
        module = MultiHeadAttention(DIM, HEADS, NOPE, ROPE, V, cross=cross)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5)
    return module.eval()


def causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("top_k", [0, 3])
def test_absorbed_equals_naive_self_attention(q_lora_rank, top_k):
    mla = make("mla", q_lora_rank=q_lora_rank)
    x = torch.randn(2, 7, DIM)
    kwargs = dict(rope=rope_1d(torch.arange(7), ROPE), mask=causal(7), top_k=top_k)
    naive, absorbed = mla(x, **kwargs), mla(x, absorbed=True, **kwargs)
    torch.testing.assert_close(absorbed, naive, **TOL)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_absorbed_equals_naive_cross_attention(q_lora_rank):
    mla = make("mla", cross=True, q_lora_rank=q_lora_rank)
    x, image_tokens = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    mask = torch.rand(2, 1, 5, 9) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    for m in (None, mask):
        naive = mla(x, context=image_tokens, mask=m)
        absorbed = mla(x, context=mla.encode_context(image_tokens), mask=m, absorbed=True)
        torch.testing.assert_close(absorbed, naive, **TOL)


@pytest.mark.parametrize("top_k", [0, 2])
def test_absorbed_decode_step_equals_naive_with_per_row_mask(top_k):
    mla = make("mla", q_lora_rank=12)
    cos, sin = rope_1d(torch.arange(7), ROPE)
    cache = mla.new_cache()
    mla(torch.randn(2, 6, DIM), rope=(cos[:6], sin[:6]), mask=causal(6), cache=cache)
    mask = torch.rand(2, 1, 1, 7) > 0.4
    mask[..., -1] = True
    x = torch.randn(2, 1, DIM)
    naive, absorbed = (
        mla(x, rope=(cos[6:], sin[6:]), mask=mask, cache=copy.copy(cache), absorbed=a, top_k=top_k)
        for a in (False, True)
    )
    torch.testing.assert_close(absorbed, naive, **TOL)


@pytest.mark.parametrize("mask_kind", ["none", "row", "per_batch", "local"])
def test_fused_decode_step_equals_separate_cache_step(mask_kind):
    """The one-call step over the joint [c_kv | k_rope] cache == the step over separate latent and RoPE tensors."""
    mla = make("mla", q_lora_rank=12)
    cos, sin = rope_1d(torch.arange(8), ROPE)
    cache = mla.new_cache()
    with torch.no_grad():
        mla(torch.randn(3, 7, DIM), rope=(cos[:7], sin[:7]), mask=causal(7), cache=cache)
    masks = {
        "none": None,
        "row": torch.ones(1, 8, dtype=torch.bool),
        "per_batch": torch.rand(3, 1, 1, 8) > 0.5,
        "local": level_mask("local", 8, causal=True, grid=None, window=2, window_2d=3, region=3, region_2d=2),
    }
    mask = masks[mask_kind]
    if mask_kind == "per_batch":
        mask[..., -1] = True
    if mask_kind == "local":
        mask = mask[-1:]
    with torch.no_grad():
        q_nope, q_rope, c_kv, k_rope, joint = mla._project(torch.randn(3, 1, DIM), (cos[7:], sin[7:]), cache, None)
    assert joint.data_ptr() == cache.joint.data_ptr() and joint.shape == (3, 8, KV_RANK + ROPE)
    fused = mla._absorbed(q_nope, q_rope, c_kv, k_rope, mask, 0, joint)
    separate = mla._absorbed(q_nope, q_rope, c_kv.contiguous(), k_rope.contiguous(), mask, 0, None)
    torch.testing.assert_close(fused, separate, **TOL)


def test_latent_cache_keeps_one_joint_buffer():
    """c_kv and k_rope are views of one [c_kv | k_rope] buffer, written in place while it has room."""
    cache = LatentKVCache.empty()
    with torch.no_grad():
        cache.append(torch.randn(2, 3, KV_RANK), torch.randn(2, 3, ROPE))
        cache.append(torch.randn(2, 1, KV_RANK), torch.randn(2, 1, ROPE))  # grows to room for 6
        before = cache.joint.data_ptr()
        latent, rope_key = torch.randn(2, 2, KV_RANK), torch.randn(2, 2, ROPE)
        cache.append(latent, rope_key)
    joint = cache.joint
    assert joint.data_ptr() == before and joint.shape == (2, 6, KV_RANK + ROPE)
    assert cache.c_kv.data_ptr() == joint.data_ptr()
    assert cache.k_rope.data_ptr() == joint.data_ptr() + KV_RANK * joint.element_size()
    torch.testing.assert_close(joint[:, 4:], torch.cat((latent, rope_key), dim=-1))
    assert cache.bytes_per_token() == (KV_RANK + ROPE) * 4
    with pytest.raises(ValueError, match="latents of size 16, got 8"):
        cache.append(torch.randn(2, 1, 8), torch.randn(2, 1, ROPE + 8))


def decode_in_steps(module, x, rope, mask, steps, absorbed=False):
    """Run x through module chunk by chunk with a cache, passing rope and mask rows for the new positions."""
    cache, outs, start = module.new_cache(), [], 0
    for end in steps:
        rope_slice = (rope[0][start:end], rope[1][start:end])
        step_mask = mask[start:end, :end]  # rows of the new queries over every key so far
        outs.append(module(x[:, start:end], rope=rope_slice, mask=step_mask, cache=cache, absorbed=absorbed))
        start = end
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind,absorbed", [("mla", False), ("mla", True), ("mha", False), ("gqa", False)])
@pytest.mark.parametrize("level,grad", [("global", True), ("local", False)])
def test_cached_decoding_equals_full_forward(kind, absorbed, level, grad):
    """With grad the caches grow by concatenation; without, tokens go into buffers with spare room."""
    module = make(kind, q_lora_rank=12 if kind == "mla" else 0)
    t = 9
    x, rope = torch.randn(2, t, DIM), rope_1d(torch.arange(t), ROPE)
    mask = level_mask(level, t, causal=True, grid=None, window=2, window_2d=3, region=3, region_2d=2)
    with torch.set_grad_enabled(grad):
        full = module(x, rope=rope, mask=mask, absorbed=absorbed)
        stepped = decode_in_steps(module, x, rope, mask, steps=[4, 5, 6, 7, 8, 9], absorbed=absorbed)
    torch.testing.assert_close(stepped, full, **TOL)


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa"])
def test_cross_attention_context_encoded_once_equals_raw_context(kind):
    module = make(kind, cross=True)
    text, image_tokens = torch.randn(2, 6, DIM), torch.randn(2, 10, DIM)
    full = module(text, context=image_tokens)
    latent = module.encode_context(image_tokens)
    stepped = torch.cat([module(text[:, i : i + 1], context=latent) for i in range(6)], dim=1)
    torch.testing.assert_close(stepped, full, **TOL)
    if kind == "mla":
        torch.testing.assert_close(module(text, context=latent, absorbed=True), full, **TOL)


def deepseek_attention(q_lora_rank, rope_interleave):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=KV_RANK,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        rope_interleave=rope_interleave,
        vocab_size=16,
        num_hidden_layers=1,
    )
    config._attn_implementation = "eager"
    return DeepseekV3Attention(config, layer_idx=0).eval(), DeepseekV3RotaryEmbedding(config)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("rope_interleave", [False, True])
def test_matches_transformers_deepseek_v3_attention(q_lora_rank, rope_interleave):
    """Copy DeepseekV3Attention's weights into ours and compare outputs, both RoPE layouts of transformers.

    rope_interleave=False uses rotate-half like ours: weights copy as they are. rope_interleave=True rotates the
    interleaved pairs (x0, x1), (x2, x3), ... and emits the even then the odd dims, i.e. rotate-half of the
    de-interleaved vector, so the RoPE output rows of q and of kv_a_proj_with_mqa are permuted [0, 2, ..., 1, 3, ...].
    """
    theirs, rotary = deepseek_attention(q_lora_rank, rope_interleave)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if "layernorm" not in name else 1.0))
    ours = make("mla", q_lora_rank=q_lora_rank or 0)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    if rope_interleave:
        perm = torch.cat((torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)))
        q_name = "q_b_proj.weight" if q_lora_rank else "q_proj.weight"
        q = state[q_name].view(HEADS, NOPE + ROPE, -1)
        q[:, NOPE:] = q[:, NOPE:][:, perm]
        state["kv_a_proj_with_mqa.weight"][KV_RANK:] = state["kv_a_proj_with_mqa.weight"][KV_RANK:][perm]
    ours.load_state_dict(state)

    t, offset = 7, 3
    x, positions = torch.randn(2, t, DIM), torch.arange(offset, offset + t)
    cos, sin = rotary(x, positions[None].expand(2, t))
    additive = torch.zeros(t, t).masked_fill(~causal(t), torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, _ = theirs(x, (cos, sin), additive[None, None].expand(2, 1, t, t))
        rope = rope_1d(positions, ROPE)
        for absorbed in (False, True):
            torch.testing.assert_close(ours(x, rope=rope, mask=causal(t), absorbed=absorbed), expected, **TOL)


@pytest.mark.parametrize("kind,absorbed", [("mla", False), ("mla", True), ("mha", False), ("gqa", False)])
def test_causal_mask_hides_future_tokens(kind, absorbed):
    module = make(kind)
    x = torch.randn(1, 8, DIM)
    y = x.clone()
    y[:, 5] += 1.0
    kwargs = dict(rope=rope_1d(torch.arange(8), ROPE), mask=causal(8), absorbed=absorbed)
    out_x, out_y = module(x, **kwargs), module(y, **kwargs)
    torch.testing.assert_close(out_y[:, :5], out_x[:, :5], atol=0, rtol=0)
    assert not torch.allclose(out_y[:, 5:], out_x[:, 5:])


@pytest.mark.parametrize("absorbed", [False, True])
def test_local_window_token_outside_has_no_influence(absorbed):
    mla = make("mla")
    mask = level_mask("local", 10, causal=False, grid=None, window=2, window_2d=3, region=3, region_2d=2)
    x = torch.randn(1, 10, DIM)
    y = x.clone()
    y[:, 9] += 1.0
    kwargs = dict(rope=rope_1d(torch.arange(10), ROPE), mask=mask, absorbed=absorbed)
    out_x, out_y = mla(x, **kwargs), mla(y, **kwargs)
    torch.testing.assert_close(out_y[:, :7], out_x[:, :7], atol=0, rtol=0)  # |9 - i| > 2
    assert not torch.allclose(out_y[:, 7], out_x[:, 7])  # |9 - 7| = 2 is inside the window


def test_gqa_equals_mha_with_key_value_heads_repeated_per_group():
    gqa, mha = make("gqa"), make("mha")
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, -1, DIM)  # (kv heads, head dim, C)
            getattr(mha, name).weight.copy_(w.repeat_interleave(HEADS // 2, dim=0).reshape(-1, DIM))
    x = torch.randn(2, 6, DIM)
    kwargs = dict(rope=rope_1d(torch.arange(6), ROPE), mask=causal(6))
    torch.testing.assert_close(gqa(x, **kwargs), mha(x, **kwargs), **TOL)
    # several queries per key head stack on the query axis, a per-row (B, 1, T, S) mask repeated with them
    row_mask = (torch.rand(2, 1, 6, 6) > 0.5) | torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(gqa(x, rope=kwargs["rope"], mask=row_mask), mha(x, rope=kwargs["rope"], mask=row_mask))
    # decoding folds the query heads of a group into one kernel call; it must agree too
    step_mask = torch.rand(2, 1, 1, 6) > 0.5  # per-row mask over the keys so far
    step_mask[..., -1] = True
    step = dict(rope=(kwargs["rope"][0][5:], kwargs["rope"][1][5:]), mask=step_mask)
    gqa_cache, mha_cache = gqa.new_cache(), mha.new_cache()
    gqa(x[:, :5], rope=(kwargs["rope"][0][:5], kwargs["rope"][1][:5]), mask=causal(5), cache=gqa_cache)
    mha(x[:, :5], rope=(kwargs["rope"][0][:5], kwargs["rope"][1][:5]), mask=causal(5), cache=mha_cache)
    torch.testing.assert_close(gqa(x[:, 5:], cache=gqa_cache, **step), mha(x[:, 5:], cache=mha_cache, **step), **TOL)


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa"])
def test_cache_bytes_per_token_match_the_formula(kind):
    module = make(kind)
    cache = module.new_cache()
    with pytest.raises(ValueError, match="empty"):
        cache.bytes_per_token()
    module(torch.randn(3, 5, DIM), rope=rope_1d(torch.arange(5), ROPE), mask=causal(5), cache=cache)
    numbers = {"mla": KV_RANK + ROPE, "mha": HEADS * (NOPE + ROPE + V), "gqa": 2 * (NOPE + ROPE + V)}[kind]
    assert cache.bytes_per_token() == numbers * 4  # fp32


def test_mha_cache_is_two_heads_times_head_dim_when_value_dim_equals_key_dim():
    mha = MultiHeadAttention(DIM, HEADS, NOPE, ROPE, NOPE + ROPE)
    mla = MultiHeadLatentAttention(DIM, HEADS, KV_RANK, NOPE, ROPE, NOPE + ROPE)
    caches = [mha.new_cache(), mla.new_cache()]
    for module, cache in zip((mha, mla), caches, strict=True):
        module(torch.randn(1, 4, DIM), cache=cache)
    assert caches[0].bytes_per_token() == 2 * HEADS * (NOPE + ROPE) * 4
    assert caches[1].bytes_per_token() == (KV_RANK + ROPE) * 4


def test_cache_expand_and_reorder_select_batch_rows():
    cache = LatentKVCache.empty()
    c_kv, k_rope = torch.randn(2, 3, KV_RANK), torch.randn(2, 3, ROPE)
    cache.append(c_kv, k_rope)
    assert cache.expand(3) is cache and cache.c_kv.shape == (6, 3, KV_RANK)
    torch.testing.assert_close(cache.c_kv[3:6], c_kv[1:2].expand(3, 3, KV_RANK))
    cache.reorder(torch.tensor([5, 0]))
    torch.testing.assert_close(cache.k_rope, torch.stack((k_rope[1], k_rope[0])))
    kv = KVCache.empty()
    kv.append(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 5))
    kv.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 5))
    assert kv.length == 4 and kv.reorder(torch.tensor([1])).k.shape == (1, 2, 4, 4)


def test_cache_buffers_keep_earlier_views_and_copies_apart():
    cache, tokens = LatentKVCache.empty(), torch.randn(1, 7, KV_RANK)
    rope_keys = torch.randn(1, 7, ROPE)
    with torch.no_grad():
        cache.append(tokens[:, :3], rope_keys[:, :3])
        first_view, _ = cache.append(tokens[:, 3:4], rope_keys[:, 3:4])  # grows to spare room
        fork = cache.copy()
        cache.append(tokens[:, 4:6], rope_keys[:, 4:6])
        fork.append(-tokens[:, 4:5], -rope_keys[:, 4:5])
    torch.testing.assert_close(first_view, tokens[:, :4])
    torch.testing.assert_close(cache.c_kv, tokens[:, :6])
    torch.testing.assert_close(cache.k_rope, rope_keys[:, :6])
    torch.testing.assert_close(fork.c_kv, torch.cat((tokens[:, :4], -tokens[:, 4:5]), dim=1))
    with torch.inference_mode():
        inference = LatentKVCache.empty()
        inference.append(tokens[:, :2], rope_keys[:, :2])
        inference.append(tokens[:, 2:3], rope_keys[:, 2:3])
    inference.append(tokens[:, 3:4], rope_keys[:, 3:4])  # inference tensors are copied, not written, out of the mode
    torch.testing.assert_close(inference.c_kv, tokens[:, :4])


@pytest.mark.parametrize("kind", ["mla", "mha"])
def test_backward_through_cached_decoding(kind):
    module = make(kind).train()
    cos, sin = rope_1d(torch.arange(5), ROPE)
    cache, x = module.new_cache(), torch.randn(1, 5, DIM)
    outs = [module(x[:, :3], rope=(cos[:3], sin[:3]), mask=causal(3), cache=cache)]
    outs += [module(x[:, i : i + 1], rope=(cos[i : i + 1], sin[i : i + 1]), cache=cache) for i in (3, 4)]
    torch.cat(outs, dim=1).square().sum().backward()
    assert module.o_proj.weight.grad.abs().sum() > 0


def test_errors_name_the_problem():
    mla, cross = make("mla"), make("mla", cross=True)
    x = torch.randn(1, 3, DIM)
    with pytest.raises(ValueError, match="needs context"):
        cross(x)
    with pytest.raises(ValueError, match="no RoPE across modalities"):
        cross(x, context=x, rope=rope_1d(torch.arange(3), ROPE))
    with pytest.raises(ValueError, match="takes no context"):
        mla(x, context=x)
    with pytest.raises(ValueError, match=r"shape \(3, 3\) or \(B, 1, 3, 3\).*shape=\(3, 4\)"):
        mla(x, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="'linear'"):
        build_attention(DIM, MLAConfig(), "linear")
    with pytest.raises(ValueError, match="n_heads=4 must be a positive multiple of n_kv_heads=3"):
        GroupedQueryAttention(DIM, 4, 3, NOPE, ROPE, V)


def test_build_attention_from_config():
    cfg = MLAConfig(n_heads=4, q_lora_rank=8, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    mla = build_attention(DIM, cfg, "mla", cross=True)
    assert isinstance(mla, MultiHeadLatentAttention) and mla.cross and mla.q_a_proj.out_features == 8
    assert mla.kv_a_proj_with_mqa.out_features == 16 + 4
    gqa = build_attention(DIM, cfg, "gqa")
    assert isinstance(gqa, GroupedQueryAttention) and gqa.n_kv_heads == cfg.n_kv_heads
    assert type(build_attention(DIM, cfg, "mha")) is MultiHeadAttention
