"""Structured pruning: a pruned module equals the original with the removed units' outputs zeroed, the importance is
the gradient of an explicit gate, and a pruned model saves, loads and runs every command."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mlm.cli import main
from mlm.compress import prune
from mlm.inference import load_model
from mlm.layers.attention import GroupedQueryAttention, MultiHeadAttention
from mlm.layers.mla import MultiHeadLatentAttention
from mlm.layers.mlp import SwiGLU
from mlm.layers.rope import rope_1d
from mlm.model import MLMModel

HEADS = (8, 4, 8)  # nope, rope, v


def _attention(kind: str, cross: bool):
    gain = 1.5 if cross else 0.0  # cross-attention: per-head query gains, which pruning must keep per head
    if kind == "mla":
        module = MultiHeadLatentAttention(
            32, 4, 16, *HEADS, q_lora_rank=12 if cross else 0, cross=cross, pos_keys=cross, gain=gain
        )
    elif kind == "gqa":
        module = GroupedQueryAttention(32, 4, 2, *HEADS, cross=cross, pos_keys=cross, gain=gain)
    else:
        module = MultiHeadAttention(32, 4, *HEADS, cross=cross, pos_keys=cross, gain=gain)
    if module.query_log_gain is not None:
        module.query_log_gain.data = torch.linspace(-0.5, 0.5, 4)  # a different gain per head
    return module


def _run(module, x, absorbed=False):
    if module.cross:
        g = torch.Generator().manual_seed(1)
        context, pos = torch.randn(2, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
        return module(x, context=context, context_pos=pos, absorbed=absorbed)
    return module(x, rope=rope_1d(torch.arange(x.shape[1]), 4), mask=torch.ones(7, 7).tril().bool(), absorbed=absorbed)


def _zero_units(module, removed: list[int]) -> None:
    """Zero the removed units' columns of the output projection: their output is gone, the rest untouched."""
    out = module.fc2 if isinstance(module, SwiGLU) else module.o_proj
    width = out.in_features // prune.units(module)
    with torch.no_grad():
        for u in removed:
            out.weight[:, u * width : (u + 1) * width] = 0


@pytest.mark.parametrize("kind", ["mla", "mha", "gqa"])
@pytest.mark.parametrize("cross", [False, True])
def test_pruned_attention_equals_the_original_without_those_heads(kind, cross):
    module = _attention(kind, cross).eval()
    x = torch.randn(2, 7, 32)
    keep = torch.tensor([0] if kind == "gqa" else [1, 3])
    removed = [u for u in range(prune.units(module)) if u not in keep.tolist()]
    reference = _attention(kind, cross).eval()
    reference.load_state_dict(module.state_dict())
    _zero_units(reference, removed)
    prune.prune_module(module, keep)
    with torch.no_grad():
        for absorbed in (False, True):
            torch.testing.assert_close(_run(module, x, absorbed), _run(reference, x, absorbed))
    assert module.n_heads == (2 if kind != "gqa" else 2) and module.o_proj.in_features == 2 * HEADS[2]


def test_pruned_feed_forward_equals_the_original_without_those_channels():
    module, reference = SwiGLU(16, 40), SwiGLU(16, 40)
    reference.load_state_dict(module.state_dict())
    keep = torch.arange(0, 40, 3)
    _zero_units(reference, [u for u in range(40) if u not in keep.tolist()])
    prune.prune_module(module, keep)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(module(x), reference(x))
    assert module.fc2.in_features == len(keep)


@pytest.mark.parametrize("kind", ["mla", "gqa", "ffn"])
def test_importance_is_the_gradient_of_a_gate_on_each_unit(kind):
    module = SwiGLU(32, 24) if kind == "ffn" else _attention(kind, False)
    out = module.fc2 if kind == "ffn" else module.o_proj
    n = prune.units(module)
    gate = torch.ones(n, requires_grad=True)
    width = out.in_features // n
    handle = out.register_forward_pre_hook(lambda _, args: (args[0] * gate.repeat_interleave(width),))
    x = torch.randn(2, 7, 32)
    loss = (module(x) if kind == "ffn" else _run(module, x)).pow(2).sum()
    loss.backward()
    handle.remove()
    torch.testing.assert_close(prune.gate_gradient(module), gate.grad)


def test_best_keeps_the_highest_scores_in_order():
    assert prune.best(torch.tensor([0.5, 2.0, 0.1, 2.0, 1.0]), 3).tolist() == [1, 3, 4]
    assert prune.kept(4, 0.5) == 2 and prune.kept(344, 0.6) == 138 and prune.kept(2, 0.9) == 1


def test_a_pruned_model_saves_loads_and_computes_the_same(tiny_model, tmp_path):
    scores = {name: torch.rand(prune.units(m)) for name, m in prune.targets(tiny_model).items()}
    report = prune.prune(tiny_model, scores, heads=0.5, ffn=0.5)
    assert report.heads == (2, 1) and report.ffn[1] == report.ffn[0] // 2
    assert report.parameters[1] < report.parameters[0]
    assert tiny_model.config.mla.n_heads == 1 and tiny_model.config.ffn_hidden_dim == report.ffn[1]
    tiny_model.save_pretrained(tmp_path / "pruned")
    loaded = MLMModel.from_pretrained(str(tmp_path / "pruned")).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(4, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids).logits, tiny_model.eval()(images, ids).logits)


def test_mlm_compress_prunes_on_calibration_data_and_the_commands_run_it(tiny_run, tmp_path, capsys):
    run, synth = tiny_run
    out = tmp_path / "pruned"
    args = ["compress", str(run), str(out), "--prune-heads", "0.5", "--prune-ffn", "0.5", "--calib", str(synth)]
    assert main([*args, "--calib-batches", "2", "--calib-batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "heads 2 -> 1" in printed and "--set model.mla.n_heads=1" in printed
    assert json.loads((out / "config.json").read_text())["mla"]["n_heads"] == 1
    images = sorted(str(p) for p in (synth / "images").glob("*.png"))[:2]
    assert main(["caption", *images, "--checkpoint", str(out), "--json"]) == 0
    assert main(["compress", str(out), str(tmp_path / "int8"), "--int8", "--engine", "fbgemm"]) == 0
    model = load_model(tmp_path / "int8", "cpu")
    assert model.config.mla.n_heads == 1


def test_pruning_is_deterministic(tiny_run, tmp_path):
    run, synth = tiny_run
    for name in ("a", "b"):
        common = ["--prune-ffn", "0.3", "--calib", str(synth), "--calib-batches", "1", "--calib-batch-size", "8"]
        assert main(["compress", str(run), str(tmp_path / name), *common]) == 0
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_pruning_input_is_one_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["compress", str(run), str(tmp_path / "a"), "--prune-heads", "1.0"]) == 2
    assert "--prune-heads 1.0: a pruning ratio is the share removed, in [0, 1)" in capsys.readouterr().err
    assert main(["compress", str(run), str(tmp_path / "a"), "--prune-ffn", "-0.1"]) == 2
    assert main(["compress", str(run), str(tmp_path / "a"), "--prune-ffn", "0.5", "--calib-batches", "0",
                 "--calib", str(tmp_path)]) == 2  # fmt: skip
    assert "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_heldout_loss_is_the_objective_on_fixed_batches(tiny_run, tiny_model):
    """bench comm scores every row by it: the same batches each call, the same value, and it moves with the weights."""
    from mlm.train.calibration import calibration_batches, calibration_loss, heldout_loss, run_settings

    run, synth = tiny_run
    config = run_settings(tiny_model, run)
    batches = calibration_batches(tiny_model, config, str(synth), "val", 2, 8)
    again = calibration_batches(tiny_model, config, str(synth), "val", 2, 8)
    assert all(torch.equal(a["text_ids"], b["text_ids"]) for a, b in zip(batches, again, strict=True))
    loss = heldout_loss(tiny_model, config, batches)
    assert loss == heldout_loss(tiny_model, config, again)
    with torch.no_grad():
        first = calibration_loss(config)(tiny_model(batches[0]["images"], batches[0]["text_ids"],
                                                    batches[0]["text_mask"]), batches[0])[0]  # fmt: skip
        second = calibration_loss(config)(tiny_model(batches[1]["images"], batches[1]["text_ids"],
                                                     batches[1]["text_mask"]), batches[1])[0]  # fmt: skip
    assert loss == pytest.approx((float(first) + float(second)) / 2, rel=1e-6)
    with torch.no_grad():
        tiny_model.decoder.lm_head.weight.mul_(0.5)  # (the projection alone would not do: embeddings are unit vectors)
    assert heldout_loss(tiny_model, config, batches) != loss
