"""Early exit: with no image stopping the adaptive pass is the full pass; an image that stops at an exit gets that
exit's states, alone or in a mixed batch; training gives every exit and gate a loss; the commands run it."""

import json

import pytest
import tiny_checkpoint
import torch

from mlm.cli import main
from mlm.config import ConfigError, MLAConfig, ModelConfig, load_config
from mlm.inference import load_model
from mlm.model import MLMModel
from mlm.train.loop import Trainer


def _model(**extra) -> MLMModel:
    mla = MLAConfig(n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    cfg = ModelConfig(dim=32, n_layers=4, image_size=32, patch_size=8, max_text_len=16, embed_dim=32, mla=mla,
                      pool_hidden_dim=16, decoder_layers=1, vocab_size=100, early_exit=True, **extra)  # fmt: skip
    return MLMModel(cfg).eval()


def _force(model, stop_at: int | None) -> None:
    """Gates that stop every image at exit ``stop_at`` (None: never)."""
    with torch.no_grad():
        for i, gate in enumerate(model.early_exit.gates):
            gate.weight.zero_()
            gate.bias.fill_(30.0 if i == stop_at else -30.0)


@pytest.mark.parametrize("levels", [["local", "local", "regional", "global"], ["global"] * 4])
def test_no_exit_is_the_full_pass_and_an_exit_gives_its_training_states(levels):
    model = _model(levels=levels)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model.image_features(images)
        _force(model, None)
        model.set_exit_threshold(0.5)
        never = model.image_features(images)
        torch.testing.assert_close(never.embeds, full.embeds, rtol=0, atol=0)
        torch.testing.assert_close(never.tokens, full.tokens, rtol=0, atol=0)
        assert model.early_exit.blocks_used.tolist() == [4, 4, 4]
        _, exits, _, _ = model.early_exit.training_pass(model.encoder, model.pooler, images)
        for stop in range(3):
            _force(model, stop)
            early = model.image_features(images)
            assert model.early_exit.blocks_used.tolist() == [stop + 1] * 3
            torch.testing.assert_close(early.embeds, exits[stop])


def test_a_mixed_batch_gives_each_image_what_it_gets_alone():
    model = _model()
    torch.manual_seed(3)
    with torch.no_grad():
        for gate in model.early_exit.gates:
            gate.weight.normal_(0, 2.0)
            gate.bias.zero_()
    images = torch.randn(8, 3, 32, 32)
    seen = []
    hook = model.early_exit.gates[0].register_forward_hook(lambda m, i, out: seen.append(out.squeeze(-1)))
    model.set_exit_threshold(1.0)
    with torch.no_grad():
        model.image_features(images)
    hook.remove()
    model.early_exit.reset_counts()
    model.set_exit_threshold(torch.sigmoid(seen[0].median()).item())  # about half the images stop at exit 0
    with torch.no_grad():
        batch = model.image_features(images)
        used = model.early_exit.blocks_used.clone()
        assert len(set(used.tolist())) > 1  # the batch mixes depths
        for i in range(8):
            alone = model.image_features(images[i : i + 1])
            assert model.early_exit.blocks_used.tolist() == [used[i].item()]
            torch.testing.assert_close(batch.embeds[i : i + 1], alone.embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.tokens[i : i + 1], alone.tokens, atol=1e-5, rtol=1e-5)
    assert model.early_exit.mean_blocks() == pytest.approx((used.sum().item() + used.sum().item()) / 16)


def test_lenses_start_as_the_identity_train_alone_and_hand_on_their_states():
    """A zero-initialised lens changes nothing; its loss reaches only the lenses (the encoder and the full depth are
    untouched); a few steps of it bring an exit's states closer to the final ones; an image that stops at a lensed
    exit gets the lensed states (decoder input) and the embedding of the training pass."""
    torch.manual_seed(0)
    plain, lensed = _model(), _model(exit_lens=True)
    lensed.load_state_dict(plain.state_dict(), strict=False)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, before, _, none = plain.early_exit.training_pass(plain.encoder, plain.pooler, images)
        _, start, _, loss0 = lensed.early_exit.training_pass(lensed.encoder, lensed.pooler, images)
    assert none is None and torch.equal(start, before)
    lensed.train()
    _, _, _, loss = lensed.early_exit.training_pass(lensed.encoder, lensed.pooler, images)
    loss.backward()
    trained = {n for n, p in lensed.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith("early_exit.lenses.") for n in trained)
    opt = torch.optim.Adam(lensed.early_exit.lenses.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        lensed.early_exit.training_pass(lensed.encoder, lensed.pooler, images)[3].backward()
        opt.step()
    lensed.eval()
    with torch.no_grad():
        after = lensed.early_exit.training_pass(lensed.encoder, lensed.pooler, images)
        assert float(after[3]) < 0.8 * float(loss0)
        torch.testing.assert_close(lensed.image_features(images).embeds, plain.image_features(images).embeds)
        _force(lensed, 1)
        lensed.set_exit_threshold(0.5)
        early = lensed.image_features(images)
        torch.testing.assert_close(early.embeds, after[1][1])
        lensed.set_exit_threshold(None)
        x, rope, masks = lensed.encoder.embed_image(images)
        for block in lensed.encoder.blocks[:2]:
            x = block(x, "image", rope=rope, mask=masks[block.level])
        torch.testing.assert_close(early.tokens, lensed.early_exit.lensed(lensed.encoder.norm(x, "image"), 1))
    with pytest.raises(ConfigError, match="model.exit_lens=true needs model.early_exit"):
        load_config(None, ["model.exit_lens=true"])


def test_grad_checkpointing_gives_the_same_exit_gradients():
    model = _model().train()
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(on)
        _, exits, logits, _ = model.early_exit.training_pass(model.encoder, model.pooler, images)
        (exits.sum() + logits.sum()).backward()
        grads.append(model.encoder.blocks[0].attn.o_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_thresholds_and_settings_are_named():
    with pytest.raises(ValueError, match="an agreement threshold is in"):
        _model().set_exit_threshold(1.5)
    plain = MLMModel(ModelConfig(dim=32, image_size=32, patch_size=8, vocab_size=100, embed_dim=32))
    with pytest.raises(ValueError, match="this model has no exits"):
        plain.set_exit_threshold(0.9)
    with pytest.raises(ConfigError, match="train.exit_weight=1.0 needs model.early_exit"):
        load_config(None, ["train.exit_weight=1.0"])


def test_training_with_exits_then_the_commands_run_with_a_threshold(tmp_path, capsys):
    from mlm.data.synthetic import generate

    synth = tmp_path / "synth"
    generate(synth, n_images=20, size=32, seed=0)
    sets = [f"data.train={synth}", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8", "train.max_steps=4",
            "train.save_every=0", "train.trackers=[csv]", "train.log_every=1", "train.mixed_precision='no'",
            "model.early_exit=true", "train.exit_weight=0.5"]  # fmt: skip
    trainer = Trainer(load_config(None, tiny_checkpoint.TINY_MODEL + sets))
    trainer.fit()
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert "loss/exits" in metrics and "loss/gates" in metrics and "loss/lens" in metrics
    gates = trainer.unwrapped.early_exit.gates[0].weight
    assert gates.abs().sum() > 0  # trained (not all zero)
    run, images = tmp_path / "run", sorted(str(p) for p in (synth / "images").glob("*.png"))[:3]
    assert main(["caption", *images, "--checkpoint", str(run), "--exit-threshold", "0.0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(row["caption"] for row in rows)
    model = load_model(run, "cpu", exit_threshold=0.0)
    model.generate(torch.randn(2, 3, 32, 32), max_new_tokens=3)  # captions read the exited states
    assert model.early_exit.blocks_used.tolist() == [1, 1]  # threshold 0: every image stops at the first exit
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run), "--data", str(synth), "--task", "retrieval", "--out", str(out)]
    assert main([*argv, "--exit-threshold", "0.0"]) == 0
    assert "early exit at 0.0: 1.00 of 2 encoder blocks per image" in capsys.readouterr().out
    report = tmp_path / "bench.json"
    argv = ["bench", "compress", "--checkpoint", str(run), "--data", str(synth), "--threads", "1", "--variants", "",
            "--exit-checkpoint", str(run), "--exit-thresholds", "0.0", "--repeats", "1", "--batch-size", "4",
            "--max-samples", "8", "--json", str(report)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["float", "exit", "exit-0"]
    assert rows["float"]["blocks"] == rows["exit"]["blocks"] == 2.0 and rows["exit-0"]["blocks"] == 1.0
    assert rows["exit"]["t2i_R@1"] == rows["float"]["t2i_R@1"]
    assert main([*argv[:-2], "--exit-thresholds", "0.5,x"]) == 2
    assert main(["caption", images[0], "--checkpoint", str(run), "--exit-threshold", "0.5", "--runtime", "onnx"]) == 2
    assert "use --runtime torch for early exit" in capsys.readouterr().err
