"""Fine-tuning with ``--init-from``: the trained weights and tokenizer start a fresh run on new data."""

from pathlib import Path

import pytest
import tiny_checkpoint
import torch

from mlm.cli import main
from mlm.config import ConfigError, load_config
from mlm.data.synthetic import generate
from mlm.inference import load_model
from mlm.train.loop import Trainer


def _config(data, out, init, *extra):
    sets = [f"data.train={data}", f"train.output_dir={out}", "train.batch_size=8", "train.warmup_steps=2",
            "train.lr=2e-3", "train.max_steps=15", "train.save_every=0", "train.trackers=[csv]",
            f"train.init_from={init}", *extra]  # fmt: skip
    return load_config(None, tiny_checkpoint.TINY_MODEL + sets)


def _loss_on(model, trainer, batches: int = 4) -> float:
    """Mean training loss of ``model`` over the first batches of the trainer's data, in eval mode."""
    model.eval()
    total, stream = 0.0, trainer._micro_batches()
    with torch.no_grad():
        for _ in range(batches):
            batch = next(stream)
            total += trainer.loss_fn(model(batch["images"], batch["text_ids"], batch["text_mask"]), batch)[0].item()
    return total / batches


def test_fine_tuning_starts_from_the_weights_and_lowers_the_loss_on_new_data(tiny_run, tmp_path):
    run, _ = tiny_run
    new = tmp_path / "new"
    generate(new, n_images=30, size=32, seed=7, holdout=False)  # other scenes, no held-out pairs
    trainer = Trainer(_config(new, tmp_path / "ft", run))
    start = load_model(run, "cpu")
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(trainer.unwrapped.state_dict()[name], tensor, msg=name)  # the trained weights
    assert (tmp_path / "ft" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    before = _loss_on(trainer.unwrapped, trainer)
    summary = trainer.fit()
    assert summary["steps"] == 15 and trainer.state.step == 15  # a fresh schedule, not the old run's step 30
    assert _loss_on(trainer.unwrapped, trainer) < before


def test_a_model_shape_mismatch_names_the_fields(tiny_run, tmp_path):
    run, synth = tiny_run
    with pytest.raises(ConfigError, match=r"model\.dim: 32 -> 48.*model\.embed_dim: 32 -> 16"):
        Trainer(_config(synth, tmp_path / "bad", run, "model.dim=48", "model.embed_dim=16"))


def test_cli_init_from_a_folder_without_a_model_is_one_line_and_exit_2(tmp_path, tiny_run, capsys):
    _, synth = tiny_run
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny-synthetic.yaml"
    args = ["train", "--config", str(config), "--set", f"data.train={synth}",
            "--set", f"train.output_dir={tmp_path / 'x'}", "--init-from", str(tmp_path / "missing")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlm train: error:") and str(tmp_path / "missing") in last


def test_broken_weights_are_named_in_one_line(tiny_run, tmp_path):
    import shutil

    from mlm.run_folder import resolve_checkpoint

    run, synth = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(resolve_checkpoint(run), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors: not usable weights"):
        Trainer(_config(synth, tmp_path / "out", broken))


def test_new_words_are_counted_without_their_punctuation():
    from mlm.data.tokenizer import MLMTokenizer
    from mlm.train.init_from import report_new_words

    tokenizer = MLMTokenizer.train_wordpiece(["a red circle", "a blue square"], 60)
    counts = report_new_words(tokenizer, ["A red circle; a zebra.", "zebra, red!"])
    assert counts == {"words": 4, "unknown": 1}  # a, red, circle, zebra: only "zebra" is [UNK]
