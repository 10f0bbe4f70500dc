"""MLMModel: forward outputs, gradients, save/load, cached generation equivalences, VQA prompts and the summary."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from mlm.commands import model as model_command
from mlm.config import ConfigError, load_config
from mlm.data.tokenizer import MLMTokenizer, vqa_prompt
from mlm.model import MLMModel

TINY = [
    "model.dim=32",
    "model.n_layers=3",
    "model.levels=[local, regional, global]",
    "model.local_window=2",
    "model.region_size=3",
    "model.image_size=16",
    "model.patch_size=4",
    "model.vocab_size=48",
    "model.embed_dim=16",
    "model.pool_hidden_dim=16",
    "model.decoder_layers=2",
    "model.mla.n_heads=2",
    "model.mla.kv_lora_rank=16",
    "model.mla.qk_nope_head_dim=8",
    "model.mla.qk_rope_head_dim=8",
    "model.mla.v_head_dim=8",
]
EOS = 3


def tiny_model(*overrides: str, tokenizer=None) -> MLMModel:
    config = load_config(None, TINY + list(overrides))
    return MLMModel(config.model, tokenizer=tokenizer, generation_config=config.eval.decoding()).eval()


def batch(b: int = 3, t: int = 7):
    images = torch.randn(b, 3, 16, 16)
    ids = torch.randint(4, 48, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, t - 2 :] = False
    ids[~mask] = 0
    return images, ids, mask


def summed_losses(out, ids, mask) -> torch.Tensor:
    """Contrastive (InfoNCE + SigLIP terms) plus caption cross-entropy, as training sums them."""
    sim = out.image_embeds @ out.text_embeds.T  # (B, B)
    target = torch.arange(sim.shape[0])
    infonce = F.cross_entropy(out.logit_scale * sim, target) + F.cross_entropy(out.logit_scale * sim.T, target)
    labels = 2 * torch.eye(sim.shape[0]) - 1
    siglip = -F.logsigmoid(labels * (out.logit_scale * sim + out.logit_bias)).mean()
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    caption = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), targets.reshape(-1))
    return infonce + siglip + caption


def test_forward_returns_normalised_embeddings_scale_bias_and_logits():
    model = tiny_model()
    images, ids, mask = batch()
    out = model(images, ids, mask)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    assert out.logits.shape == (3, 7, 48) and out.image_tokens.shape == (3, 16, 32)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5) and out.logit_bias.item() == -10.0
    torch.testing.assert_close(model.encode_image(images, normalize=True), out.image_embeds)
    torch.testing.assert_close(model.encode_text(ids, normalize=True, text_mask=mask), out.text_embeds)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(images, ids, mask).logit_scale.item() == 100.0  # clamped


def test_padding_never_changes_the_text_embedding_or_real_token_logits():
    model = tiny_model()
    images, ids, mask = batch()
    other = ids.clone()
    other[~mask] = 7
    a, b = model(images, ids, mask), model(images, other, mask)
    torch.testing.assert_close(a.text_embeds, b.text_embeds)
    torch.testing.assert_close(a.logits[mask], b.logits[mask])
    with pytest.raises(ValueError, match="right-padded"):
        model(images, ids, mask.flip(-1))


@pytest.mark.parametrize(
    "overrides",
    [["model.sharing=full", "model.top_k=4"], ["model.sharing=norms"], ["model.sharing=ffn", "model.attention=gqa"]],
)
def test_every_parameter_gets_a_gradient_from_the_summed_losses(overrides):
    model = tiny_model(*overrides).train()
    images, ids, mask = batch()
    summed_losses(model(images, ids, mask), ids, mask).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    images, ids, mask = batch()
    summed_losses(model(images, ids, mask), ids, mask).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    summed_losses(model(images, ids, mask), ids, mask).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


@pytest.mark.parametrize("overrides", [[], ["model.word_head=true", "model.word_head_patches=true"]])
def test_an_image_in_two_rows_is_encoded_once_with_the_same_outputs_and_gradients(overrides, monkeypatch):
    import mlm.model

    torch.manual_seed(0)  # its own inputs, whatever ran before
    model = tiny_model(*overrides).train()
    images, ids, mask = batch(4)
    images[2] = images[0]  # a caption row and a VQA row about one image
    calls = []
    encode = model.encoder.encode_image
    monkeypatch.setattr(model.encoder, "encode_image", lambda x: calls.append(x.shape[0]) or encode(x))

    def run():
        model.zero_grad()
        out = model(images, ids, mask)
        loss = summed_losses(out, ids, mask) + (0 if out.word_logits is None else out.word_logits.square().mean())
        loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    once, grads = run()
    monkeypatch.setattr(mlm.model, "unique_images", lambda x: (x, None))
    every, every_grads = run()
    assert calls == [3, 4]
    for name in ("image_embeds", "text_embeds", "logits", "image_tokens", "word_logits"):
        if getattr(every, name) is not None:
            torch.testing.assert_close(getattr(once, name), getattr(every, name), msg=name)
    assert grads.keys() == every_grads.keys()
    for name, grad in grads.items():  # sums over every token (modality_embed: ~1e2) differ in their last bits only
        scale = max(every_grads[name].abs().max().item(), 1.0)
        torch.testing.assert_close(grad, every_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_unique_images_finds_repeated_rows_only():
    from mlm.model_outputs import unique_images

    images = torch.randn(5, 3, 4, 4)
    assert unique_images(images)[1] is None
    images[3], images[4] = images[1], images[1]
    distinct, rows = unique_images(images)
    assert distinct.shape == (3, 3, 4, 4)
    torch.testing.assert_close(distinct[rows], images)
    same_sums = torch.stack([torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])]).view(2, 1, 1, 2)
    assert unique_images(same_sums)[1] is None  # equal sums, different images
    assert unique_images(images.requires_grad_())[1] is None


def test_save_and_load_round_trip_with_tokenizer_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = MLMTokenizer.train_wordpiece(["a red circle", "a blue square", "question: what? answer: red"], 48)
    model = tiny_model("model.sharing=ffn", tokenizer=tokenizer)
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)

    loaded = MLMModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.decoder.lm_head.weight is loaded.encoder.token_embed.weight
    assert loaded.tokenizer.encode("a red circle") == tokenizer.encode("a red circle")
    images, ids, mask = batch()
    a, b = model(images, ids, mask), loaded(images, ids, mask)
    for field in ("image_embeds", "text_embeds", "logit_scale", "logit_bias", "logits"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=0)


def test_loading_a_folder_without_weights_names_the_missing_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MLMModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.attention=mla", "model.top_k=3"],
        ["model.attention=gqa", "model.top_k=3"],
        ["model.cross_null=true", "model.cross_pos_keys=true", "model.cross_pos_values=true", "model.top_k=3"],
        ["model.top_k=-1", "model.sparsity_schedule=[2,0.9,8,0.3]"],  # length-adaptive: each row its own k
        ["model.cross_query_gain=2.0", "model.cross_pos_keys=true"],
        ["model.attention=gqa", "model.cross_query_gain=0.5"],
        ["model.decoder_short_conv=3", "model.attention=mha"],
        ["model.decoder_grounding=2", "model.word_head=true", "model.word_head_patches=true", "model.top_k=3"],
    ],
)
def test_cached_step_by_step_decoding_equals_one_full_forward(overrides):
    model = tiny_model(*overrides)
    if model.decoder.pos_values is not None:
        torch.nn.init.normal_(model.decoder.pos_values.weight)  # it starts at zero
    if model.decoder.short_conv is not None:
        torch.nn.init.normal_(model.decoder.short_conv.conv.weight)  # so does the convolution
    if model.decoder.grounding is not None:
        torch.nn.init.normal_(model.decoder.grounding.out.weight)  # and what the word grounding adds
    images, ids, _ = batch(2, 9)
    with torch.no_grad():
        image_tokens = model.encoder.encode_image(images).tokens
        full = model.text_logits(image_tokens, ids)  # naive path, no cache
        cache = model.start_decoding(image_tokens, total_len=9)
        steps = [model.decode_step(ids[:, :4], cache)]  # prefill a prompt, then one token at a time
        steps += [model.decode_step(ids[:, t : t + 1], cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full, model(images, ids).logits)


def test_greedy_with_cache_equals_recomputing_the_full_forward_and_one_beam():
    model = tiny_model()
    images = torch.randn(3, 3, 16, 16)
    prompts = [[1], [1, 9, 12], [1]]  # mixed prompt lengths in one batch
    kwargs = dict(max_new_tokens=6, eos_id=EOS)
    cached = model.generate_ids(images, prompts, **kwargs)
    assert cached == model.generate_ids(images, prompts, use_cache=False, **kwargs)
    assert cached == model.generate_ids(images, prompts, num_beams=1, **kwargs)
    assert all(len(seq) == 6 for seq in cached)  # EOS is unlikely to be the argmax of an untrained model
    assert cached[1] == model.generate_ids(images[1:2], prompts[1:2], **kwargs)[0]  # batching does not matter


def test_greedy_stops_at_eos():
    model = tiny_model()
    for seed in range(20):  # an untrained model may repeat one token; find images whose output varies
        images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        first = model.generate_ids(images, [[1], [1]], max_new_tokens=8, eos_id=EOS)
        later_new = [tok for i, tok in enumerate(first[0]) if i > 0 and tok not in first[0][:i]]
        if later_new:
            break
    stop = later_new[0]  # a later, new token
    stopped = model.generate_ids(images, [[1], [1]], max_new_tokens=8, eos_id=stop)
    for row, seq in enumerate(first):
        assert stopped[row] == (seq[: seq.index(stop)] if stop in seq else seq)
    assert 0 < len(stopped[0]) < 8


def test_beam_search_with_cache_equals_without_and_nucleus_is_seeded():
    model = tiny_model()
    images = torch.randn(2, 3, 16, 16)
    kwargs = dict(max_new_tokens=4, eos_id=EOS, num_beams=3)
    assert model.generate_ids(images, **kwargs, prompt_ids=[[1], [1]]) == model.generate_ids(
        images, [[1], [1]], use_cache=False, **kwargs
    )
    sample = lambda p, seed: model.generate_ids(  # noqa: E731
        images, [[1], [1]], max_new_tokens=5, eos_id=EOS, top_p=p, generator=torch.Generator().manual_seed(seed)
    )
    assert sample(0.9, 0) == sample(0.9, 0)
    assert sample(1e-6, 0) == model.generate_ids(images, [[1], [1]], max_new_tokens=5, eos_id=EOS)  # top-1 nucleus
    assert sample(1.0, 0) != sample(1.0, 1)


GROUNDED = ["model.decoder_grounding=3", "model.word_head=true", "model.word_head_patches=true"]


@pytest.mark.parametrize(
    "overrides, weight",
    [(["model.decoder_short_conv=3"], "short_conv.conv.weight"), (GROUNDED, "grounding.out.weight")],
)
def test_beam_search_through_the_decoders_input_state_equals_recomputing(overrides, weight):
    model = tiny_model(*overrides)
    torch.nn.init.normal_(model.decoder.get_parameter(weight))  # it starts at zero
    images, prompts = torch.randn(2, 3, 16, 16), [[1, 9], [1, 12]]
    kwargs = dict(max_new_tokens=5, eos_id=EOS, num_beams=3)
    assert model.generate_ids(images, prompts, **kwargs) == model.generate_ids(
        images, prompts, use_cache=False, **kwargs
    )


def test_settings_of_the_decoders_input_that_cannot_work_are_named():
    with pytest.raises(ConfigError, match="model.decoder_short_conv=1 mixes no tokens"):
        tiny_model("model.decoder_short_conv=1")
    with pytest.raises(ConfigError, match="model.decoder_grounding=2 needs model.word_head"):
        tiny_model("model.decoder_grounding=2")
    with pytest.raises(ConfigError, match="does not work with model.match_head"):
        tiny_model("model.decoder_grounding=2", "model.word_head=true", "model.word_head_patches=true",
                    "model.match_head=true")  # fmt: skip


def test_generate_and_answer_decode_with_the_tokenizer():
    texts = ["a red circle", "a blue square", vqa_prompt("what color is the circle?") + " red"]
    tokenizer = MLMTokenizer.train_wordpiece(texts, 48)
    model = tiny_model(tokenizer=tokenizer)
    images = torch.randn(2, 3, 16, 16)
    questions = ["what color is the circle?", "what shape?"]
    prompt_ids = [tokenizer.encode(vqa_prompt(q), eos=False) for q in questions]
    expected = [tokenizer.decode(seq) for seq in model.generate_ids(images, prompt_ids, max_new_tokens=3)]
    assert model.answer(images, questions, max_new_tokens=3) == expected
    captions = model.generate(images, max_new_tokens=3)
    assert captions == [tokenizer.decode(s) for s in model.generate_ids(images, max_new_tokens=3)]


def test_generation_arguments_are_checked():
    model = tiny_model()
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="not both"):
        model.generate_ids(images, [[1]], eos_id=EOS, num_beams=2, top_p=0.9)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(images)
    with pytest.raises(ValueError, match="one non-empty prompt per image"):
        model.generate_ids(images, [[1], [1]], eos_id=EOS)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokenizer = MLMTokenizer.train_wordpiece([" ".join(letters), letters], 100)  # whole letters and ##letters
    assert tokenizer.vocab_size > 48
    with pytest.raises(ValueError, match="model.vocab_size=48"):
        tiny_model(tokenizer=tokenizer)


def test_kv_cache_bytes_and_summary_count_what_the_config_implies(capsys):
    model = tiny_model()
    per_layer = (16 + 8) * 4  # kv_lora_rank + qk_rope_head_dim numbers, fp32
    assert model.kv_cache_bytes() == {
        "encoder": 3 * per_layer,
        "decoder": 2 * per_layer,
        "per_token": 5 * per_layer,
        "per_image": 2 * 16 * per_layer,
    }
    gqa = tiny_model("model.attention=gqa", "model.mla.n_kv_heads=1")
    assert gqa.kv_cache_bytes()["per_token"] == 5 * 1 * (16 + 8) * 4  # one KV head: K (8 + 8) + V (8)

    parser = argparse.ArgumentParser()
    model_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["model", "summary", *(x for o in TINY for x in ("--set", o))])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in printed and "encoder" in printed and "decoder" in printed
    assert f"{5 * per_layer:,} bytes" in printed
    model.pooler.requires_grad_(False)
    rows = {name: (count, train) for name, count, train in model_command.parameter_table(model, depth=1)}
    assert list(rows) == ["encoder", "pooler", "decoder", "logit_scale", "logit_bias"]
    assert sum(count for count, _ in rows.values()) == total
    assert rows["pooler"] == (sum(p.numel() for p in model.pooler.parameters()), 0)
    tied = model.decoder.lm_head.weight.numel()  # counted once, with the encoder's token embedding
    assert rows["decoder"][0] == sum(p.numel() for p in model.decoder.parameters()) - tied


@pytest.mark.slow
def test_a_model_trained_on_four_captions_generates_them_back():
    captions = ["a red circle", "a blue square", "two green triangles", "one yellow star"]
    tokenizer = MLMTokenizer.train_wordpiece(captions, 48)
    model = tiny_model(tokenizer=tokenizer).train()
    images = torch.randn(4, 3, 16, 16)
    ids, mask = tokenizer.encode_batch(captions, 24)  # a 48-piece vocabulary splits words into near-characters
    assert [tokenizer.decode(row.tolist()) for row in ids] == captions  # nothing truncated
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = summed_losses(model(images, ids, mask), ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model.generate(images, max_new_tokens=20) == captions
    assert model.generate(images, max_new_tokens=20, num_beams=3) == captions
    assert model.generate(images, ["a", "a blue", "two", "one"], max_new_tokens=20) == [
        "red circle", "square", "green triangles", "yellow star"
    ]  # fmt: skip
    retrieved = (model.encode_image(images, True) @ model.encode_text(ids, True, text_mask=mask).T).argmax(dim=1)
    assert retrieved.tolist() == [0, 1, 2, 3]


def test_the_null_token_and_position_values_are_what_the_decoder_reads_and_learns():
    model = tiny_model("model.cross_null=true", "model.cross_pos_keys=true", "model.cross_pos_values=true").train()
    images, ids, mask = batch()
    contexts = model.decoder.encode_contexts(model.encoder.encode_image(images).tokens)
    assert contexts[0].length == 16 + 1  # 4x4 patches after the null token
    summed_losses(model(images, ids, mask), ids, mask).backward()
    assert model.decoder.null_token.grad.abs().sum() > 0
    assert model.decoder.pos_values.weight.grad.abs().sum() > 0  # zero at the start, and it learns


def test_cross_level_feeds_the_decoder_an_earlier_levels_states_and_cached_decoding_matches():
    model = tiny_model("model.cross_level=regional", "model.cross_pos_keys=true")
    images, ids, mask = batch()
    out = model.encoder.encode_image(images)
    tokens = model.image_features(images).tokens
    torch.testing.assert_close(tokens, out.levels["regional"], rtol=0, atol=0)
    assert not torch.allclose(tokens, out.tokens)  # the global block still runs, for pooling only
    torch.testing.assert_close(model(images, ids, mask).image_tokens, tokens, rtol=0, atol=0)
    full = model.text_logits(tokens, ids)
    cache = model.start_decoding(tokens, ids.shape[1])
    steps = torch.cat([model.decode_step(ids[:, i : i + 1], cache) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_cross_level_must_name_one_of_the_models_levels():
    with pytest.raises(Exception, match=r"model.cross_level='routed' is not in model.levels \(local, regional, glo"):
        tiny_model("model.cross_level=routed")
