"""Width pruning (``mlm compress --prune-dim``): which axes are the residual stream, the importance is the gradient of
a gate on each channel, the kept weights are the original's, and the narrower model saves, loads and runs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from mlm.cli import main
from mlm.compress import width
from mlm.config import TrainConfig
from mlm.data.collate import IGNORE_INDEX
from mlm.inference import load_model
from mlm.train.losses import ImageTextLoss


def _batch(model, rows=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, vocab = model.config.image_size, model.config.vocab_size
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    return {"images": torch.randn(rows, 3, size, size, generator=g), "text_ids": ids,
            "text_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels,
            "is_vqa": torch.tensor([False, True] * (rows // 2))}  # fmt: skip


def _gate_gradient(model, axes, batch, loss_fn) -> torch.Tensor:
    """|dL/dgate| for a gate of ones on each residual channel, scaling every entry of channel c (in every copy of
    the stream an axis holds) by gate[c]."""
    dim = model.config.dim
    gate = torch.ones(dim, requires_grad=True)
    params = {}
    for name, p in model.named_parameters():
        value = p.detach()
        for entry in axes.get(name, []):
            axis, copies = entry if isinstance(entry, tuple) else (entry, 1)
            full = torch.cat([gate.repeat(copies), torch.ones(value.shape[axis] - dim * copies)])
            shape = [1] * value.dim()
            shape[axis] = -1
            value = value * full.view(shape)
        params[name] = value
    params["decoder.lm_head.weight"] = params["encoder.token_embed.weight"]  # tied
    out = functional_call(model, params, (batch["images"], batch["text_ids"], batch["text_mask"]))
    loss_fn(out, batch)[0].backward()
    return gate.grad.abs()


def test_the_residual_axes_are_the_stream_s_and_nothing_else(tiny_model):
    narrow = width.narrower_model(tiny_model, 0.5)
    axes = width.residual_axes(tiny_model, narrow)
    assert (
        narrow.config.dim == 16
        and narrow.config.ffn_hidden_dim == tiny_model.encoder.blocks[0].ffn.shared.fc2.in_features
    )
    assert axes["encoder.token_embed.weight"] == [1]  # (V, C); the tied LM head is the same tensor
    assert axes["encoder.patch_embed.proj.weight"] == [0]  # writes the stream
    assert axes["encoder.blocks.0.attn.q_proj.weight"] == [1]  # reads it
    assert axes["encoder.blocks.0.attn.o_proj.weight"] == [0]  # writes it
    assert axes["encoder.blocks.0.attn_norm.shared.weight"] == [0]
    assert axes["pooler.proj.weight"] == [1]  # the shared space keeps its size
    # per-head and latent sizes do not follow the width, even where they equal it (2 heads x (8 + 8) = 32)
    assert "encoder.blocks.0.attn.kv_b_proj.weight" not in axes
    assert "encoder.blocks.0.attn.kv_a_layernorm.weight" not in axes


def test_channel_importance_is_the_gradient_of_a_gate_on_each_channel(tiny_model):
    batch = _batch(tiny_model)
    narrow = width.narrower_model(tiny_model, 0.5)
    axes = width.residual_axes(tiny_model, narrow)
    loss_fn = ImageTextLoss.from_config(TrainConfig())
    scores = width.channel_importance(tiny_model, axes, [batch], loss_fn)
    torch.testing.assert_close(scores, _gate_gradient(tiny_model, axes, batch, loss_fn), rtol=1e-4, atol=1e-6)


def test_the_narrow_model_keeps_the_original_weights_at_the_kept_channels(tiny_model):
    scores = torch.arange(tiny_model.config.dim, dtype=torch.float).flip(0)  # the first half is the most important
    empty = width.narrower_model(tiny_model, 0.5)
    narrow = width.prune_width(tiny_model, empty, width.residual_axes(tiny_model, empty), scores)
    keep = torch.arange(16)
    wide = dict(tiny_model.named_parameters())
    small = dict(narrow.named_parameters())
    torch.testing.assert_close(small["encoder.token_embed.weight"], wide["encoder.token_embed.weight"][:, keep])
    torch.testing.assert_close(small["decoder.layers.0.ffn.fc2.weight"], wide["decoder.layers.0.ffn.fc2.weight"][keep])
    torch.testing.assert_close(small["encoder.blocks.1.attn.kv_b_proj.weight"],
                               wide["encoder.blocks.1.attn.kv_b_proj.weight"])  # fmt: skip
    assert narrow.decoder.lm_head.weight is narrow.encoder.token_embed.weight  # still tied
    assert narrow.tokenizer is tiny_model.tokenizer
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(4, 60, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(narrow(images, ids).logits).all()


def test_mlm_compress_prune_dim_writes_a_narrower_model_the_commands_run(tiny_run, tmp_path, capsys):
    run, synth = tiny_run
    out = tmp_path / "narrow"
    common = ["--calib", str(synth), "--calib-batches", "2", "--calib-batch-size", "8"]
    assert main(["compress", str(run), str(out), "--prune-dim", "0.5", "--prune-heads", "0.5", *common]) == 0
    printed = capsys.readouterr().out
    assert "width 32 -> 16" in printed and "heads 2 -> 1" in printed and "--set model.dim=16" in printed
    assert "n_kv_heads" not in printed  # an MLA model has no key/value head setting to pass on
    saved = json.loads((out / "config.json").read_text())
    assert saved["dim"] == 16 and saved["mla"]["n_heads"] == 1
    images = sorted(str(p) for p in (synth / "images").glob("*.png"))[:2]
    assert main(["caption", *images, "--checkpoint", str(out), "--json"]) == 0
    assert load_model(out, "cpu").config.dim == 16
    again = tmp_path / "again"
    assert main(["compress", str(run), str(again), "--prune-dim", "0.5", "--prune-heads", "0.5", *common]) == 0
    a, b = (load_file(folder / "model.safetensors") for folder in (out, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # deterministic


def test_a_bad_width_ratio_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["compress", str(run), str(tmp_path / "a"), "--prune-dim", "1.0"]) == 2
    assert "--prune-dim 1.0: a pruning ratio is the share removed, in [0, 1)" in capsys.readouterr().err
    assert main(["compress", str(run), str(tmp_path / "a"), "--prune-dim", "0.3"]) == 2  # width 22: not a multiple of 4
    err = capsys.readouterr().err
    assert "--prune-dim 0.3 leaves model.dim=22, which the model cannot have" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_a_model_with_lora_adapters_is_merged_first(tiny_model):
    from mlm.lora import apply_lora, peft_config

    apply_lora(tiny_model, peft_config(2, 4.0, 0.0, ["q_proj"]))
    narrow = width.narrower_model(tiny_model, 0.5)
    with pytest.raises(ValueError, match="merge them first"):
        width.residual_axes(tiny_model, narrow)


def test_an_axis_of_several_copies_of_the_stream_is_pruned_in_every_copy():
    from mlm.config import load_config
    from mlm.model import MLMModel

    sets = ["model.dim=32", "model.n_layers=2", "model.levels=[local, global]", "model.image_size=16",
            "model.patch_size=4", "model.vocab_size=48", "model.embed_dim=16", "model.pool_hidden_dim=16",
            "model.decoder_layers=1", "model.mla.n_heads=2", "model.mla.kv_lora_rank=16",
            "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=8",
            "model.word_head=true", "model.word_head_patches=true", "model.decoder_grounding=3"]  # fmt: skip
    model = MLMModel(load_config(None, sets).model).eval()
    torch.nn.init.normal_(model.decoder.grounding.out.weight)  # it starts at zero
    narrow = width.narrower_model(model, 0.5)
    axes = width.residual_axes(model, narrow)
    assert axes["decoder.grounding.out.weight"] == [0, (1, 3)]  # (C, 3 heads x C + 3 x 2 scores)
    assert axes["decoder.grounding.value.weight"] == [0, 1]
    scores = torch.arange(32, dtype=torch.float)  # the last half is the most important
    small = dict(width.prune_width(model, narrow, axes, scores).named_parameters())
    keep = torch.arange(16, 32)
    cols = torch.cat([keep, keep + 32, keep + 64, torch.arange(96, 102)])
    wide = model.decoder.grounding.out.weight
    torch.testing.assert_close(small["decoder.grounding.out.weight"], wide[keep][:, cols])
    assert width.stream_index(torch.tensor([1]), 2, 5, 2).tolist() == [1, 3, 4]
    batch = _batch(model)  # the importance of a channel counts it in every copy
    loss_fn = ImageTextLoss.from_config(TrainConfig())
    importance = width.channel_importance(model, axes, [batch], loss_fn)
    torch.testing.assert_close(importance, _gate_gradient(model, axes, batch, loss_fn), rtol=1e-4, atol=1e-6)
