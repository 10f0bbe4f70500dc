"""LoRA through PEFT (``train.lora``): only adapters train, checkpoints hold PEFT's files, the absorbed MLA path
sees the adapters, and ``mlm export --merge-lora`` writes a plain model equal to the adapted one."""

import json
from pathlib import Path

import pytest
import torch
from test_init_from import _config, _loss_on

from mlm.cli import main
from mlm.config import load_config
from mlm.data.synthetic import generate
from mlm.inference import load_model
from mlm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, has_lora, lora_settings, merge_lora
from mlm.model import MLMModel
from mlm.run_folder import resolve_checkpoint
from mlm.train.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _randomise_updates(model):
    """LoRA starts as the identity (B = 0); give the updates values so that they change the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_shipped_config_trains_under_five_percent_and_merging_changes_nothing():
    config = load_config(CONFIGS / "tiny-synthetic.yaml", ["train.lora.rank=4"])
    model = MLMModel(config.model).eval()
    total = sum(p.numel() for p in model.parameters())
    trained = lora_settings(model, config.train.lora)
    assert 0 < trained < 0.05 * total
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    _randomise_updates(model)
    images, ids = torch.randn(2, 3, 60, 60), torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        adapted = model(images, ids).logits
        # cached, absorbed decoding reads kv_b_proj as a matrix: it must see the adapter too
        cached = model.generate_ids(images, [[2], [2]], max_new_tokens=5, eos_id=-1)
        full = model.generate_ids(images, [[2], [2]], max_new_tokens=5, eos_id=-1, use_cache=False)
        assert cached == full
        merge_lora(model)
        assert not has_lora(model) and sum(p.numel() for p in model.parameters()) == total
        torch.testing.assert_close(model(images, ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_targets_that_match_nothing_are_named():
    config = load_config(CONFIGS / "tiny-synthetic.yaml", ["train.lora.rank=2", "train.lora.target_modules=[qkv]"])
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\] names no Linear layer.*kv_b_proj"):
        lora_settings(MLMModel(config.model), config.train.lora)


def test_lora_fine_tuning_checkpoint_and_merged_export(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    new = tmp_path / "new"
    generate(new, n_images=30, size=32, seed=7, holdout=False)
    lora = ["train.lora.rank=2", "train.lora.alpha=4", "train.lr=3e-2", "train.max_steps=40"]
    trainer = Trainer(_config(new, tmp_path / "ft", run, *lora))
    start = load_model(run, "cpu").state_dict()
    before = _loss_on(trainer.unwrapped, trainer)
    trainer.fit()
    assert _loss_on(trainer.unwrapped, trainer) < before
    folder = resolve_checkpoint(tmp_path / "ft")
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["r"] == 2  # PEFT's own file
    adapted = MLMModel.from_pretrained(folder)
    assert has_lora(adapted)
    base = {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    for name, tensor in start.items():
        torch.testing.assert_close(base[name], tensor, rtol=0, atol=0, msg=name)  # the base stayed frozen

    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "ft"), "--out", str(out), "--merge-lora"]) == 0
    assert "LoRA adapters merged" in capsys.readouterr().out
    assert not (out / ADAPTER_CONFIG).exists() and (out / "tokenizer.json").is_file()
    merged = load_model(out, "cpu")
    images = torch.randn(2, 3, 32, 32)
    ids, mask = merged.tokenizer.encode_batch(["a red circle.", "two blue squares."], 24)
    with torch.no_grad():
        a, b = adapted(images, ids, mask), merged(images, ids, mask)
        assert merged.generate(images) == adapted.generate(images)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.image_embeds, a.image_embeds, rtol=1e-4, atol=1e-5)

    assert main(["export", str(tmp_path / "ft"), "--out", str(out)]) == 2  # never over a folder with files
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_modules": None}, "target_modules=None must be a list"),
        ({"target_modules": ".*proj"}, "must be a list of module names"),
        ({"r": 2**31}, "must be an integer from 1 to 4096"),
        ({"use_dora": True}, "use_dora=True is not a plain LoRA adapter"),
        ({"peft_type": "IA3"}, "expected the adapter_config.json of a LoRA adapter"),
    ],
)
def test_crafted_adapter_configs_are_refused_in_one_line(tmp_path, change, message):
    import shutil

    config = load_config(CONFIGS / "tiny-synthetic.yaml", ["train.lora.rank=2"])
    model = MLMModel(config.model)
    lora_settings(model, config.train.lora)
    model.save_pretrained(tmp_path / "m")
    settings = json.loads((tmp_path / "m" / ADAPTER_CONFIG).read_text())
    (tmp_path / "m" / ADAPTER_CONFIG).write_text(json.dumps({**settings, **change}))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: not a usable LoRA adapter config \(.*{message}"):
        MLMModel.from_pretrained(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")


def test_adapter_weights_that_do_not_fit_are_named(tmp_path):
    config = load_config(CONFIGS / "tiny-synthetic.yaml", ["train.lora.rank=2"])
    model = MLMModel(config.model)
    lora_settings(model, config.train.lora)
    model.save_pretrained(tmp_path / "m")
    settings = json.loads((tmp_path / "m" / ADAPTER_CONFIG).read_text())
    (tmp_path / "m" / ADAPTER_CONFIG).write_text(json.dumps({**settings, "r": 3}))  # weights are rank 2
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not adapter weights for"):
        MLMModel.from_pretrained(tmp_path / "m")
