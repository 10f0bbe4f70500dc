"""train.qat: fake INT8 with a straight-through gradient, float checkpoints, and an INT8 conversion that computes what
training saw."""

import json

import pytest
import torch
from test_loop import _trainer
from tiny_run import tiny_config

from mlm.cli import main
from mlm.compress import int8
from mlm.compress.qat import is_qat, prepare_qat
from mlm.config import ConfigError, load_config
from mlm.inference import load_model
from mlm.train import checkpoint as ckpt
from tests.test_model import tiny_model


def test_fake_quantization_keeps_names_rounds_the_forward_and_passes_gradients():
    torch.manual_seed(0)
    model = tiny_model()
    images, ids = torch.randn(2, 3, 16, 16), torch.randint(4, 48, (2, 7))
    float_logits = model(images, ids).logits.detach()
    keys = set(model.state_dict())
    names = prepare_qat(model)
    assert is_qat(model) and set(model.state_dict()) == keys  # checkpoints keep their layout
    assert "decoder.lm_head" not in names and not any(n.endswith("kv_b_proj") for n in names)
    out = model(images, ids)
    assert 0 < (out.logits - float_logits).abs().max() < 0.1 * float_logits.abs().max()
    (out.logits.square().mean() + (out.image_embeds * out.text_embeds).sum()).backward()
    for name in names:  # the straight-through estimator: rounding does not stop the gradient
        assert model.get_submodule(name).weight.grad.abs().sum() > 0


def test_the_int8_conversion_computes_what_qat_trained_with():
    torch.manual_seed(0)
    trained = tiny_model()
    with torch.no_grad():  # tables and the patch convolution are rounded at conversion only (mlm/compress/qat.py)
        for name in int8.embeddings(trained):
            weight = trained.get_submodule(name).weight
            codes, scale = int8.int8_rows(weight)
            weight.copy_(codes.float() * scale)
    converted, symmetric = tiny_model(), tiny_model()
    converted.load_state_dict(trained.state_dict())
    symmetric.load_state_dict(trained.state_dict())
    prepare_qat(trained)
    int8.quantize_int8(converted, activations="asymmetric")
    int8.quantize_int8(symmetric)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fake, real, other = (m.encoder.encode_image(images).tokens for m in (trained, converted, symmetric))
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)  # the same rounding, not just a close one
    assert (other - fake).abs().max() > 1e-3  # the default input scheme is another rounding
    with pytest.raises(ValueError, match="a QAT model converts with --engine torchao"):
        int8.quantize_int8(tiny_model(), engine="fbgemm", activations="asymmetric")


def test_a_qat_run_resumes_and_compresses_with_its_input_scheme(synth_dir, tmp_path, capsys):
    sets = ["train.max_steps=4", "train.save_every=2", "train.qat=true", "train.deterministic=true"]
    run = tmp_path / "qat"
    assert _trainer(tiny_config(synth_dir, run, *sets)).fit()["status"] == "completed"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = ckpt.checkpoints_root(run) / "step_000002"
    import shutil

    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    assert _trainer(tiny_config(synth_dir, resumed, *sets), resume="latest").fit()["steps"] == 4
    a = load_model(run, "cpu").state_dict()
    b = load_model(resumed, "cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # fake quantization holds no state that resume could lose
    assert main(["compress", str(run), str(tmp_path / "int8"), "--int8"]) == 0
    assert "asymmetric inputs as trained with train.qat" in capsys.readouterr().out
    assert json.loads((tmp_path / "int8" / int8.QUANT_FILE).read_text())["activations"] == "asymmetric"
    loaded = load_model(tmp_path / "int8", "cpu")
    assert loaded.quantization["activations"] == "asymmetric" and loaded.generate(torch.zeros(1, 3, 32, 32))
    report = tmp_path / "bench.json"
    argv = [
        "bench",
        "compress",
        "--checkpoint",
        str(run),
        "--qat-checkpoint",
        str(run),
        "--data",
        str(synth_dir),
        "--variants",
        "float",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--batch-size",
        "2",
        "--max-samples",
        "4",
    ]
    assert main([*argv, "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["float", "int8-qat"] and rows[1]["size_ratio"] < 0.5


def test_qat_with_lora_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="train.qat"):
        load_config(None, ["train.qat=true", "train.lora.rank=4", "train.lora.target_modules=[q_proj]"])
