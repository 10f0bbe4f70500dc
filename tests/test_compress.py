"""mlm compress --int8: a smaller folder that loads with the normal loader, runs the commands, and refuses bad input."""

import json
import shutil

import pytest
import torch

from mlm import inference
from mlm.cli import main
from mlm.compress import int8
from mlm.model import MLMModel
from mlm.run_folder import resolve_checkpoint


@pytest.fixture(scope="module")
def compressed(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model"
    assert main(["compress", str(tiny_run[0]), str(out), "--int8", "--engine", "fbgemm"]) == 0
    return out


@pytest.mark.parametrize("engine", ["torchao", "fbgemm"])
def test_int8_codes_round_trip_exactly_and_outputs_stay_close(tiny_run, tmp_path, engine):
    float_model = inference.load_model(tiny_run[0], "cpu")
    quantized = inference.load_model(tiny_run[0], "cpu")
    names = int8.quantize_int8(quantized, engine=engine)
    assert "decoder.lm_head" not in names and not any(n.endswith("kv_b_proj") for n in names)
    quantized.save_pretrained(tmp_path / "int8")
    loaded = MLMModel.from_pretrained(str(tmp_path / "int8"))
    assert loaded.quantization == quantized.quantization
    for name in names:  # the file holds the in-memory model's codes and scales
        assert int8._layer_tensors(loaded, name).keys() == int8._layer_tensors(quantized, name).keys()
        for key, value in int8._layer_tensors(loaded, name).items():
            torch.testing.assert_close(value, int8._layer_tensors(quantized, name)[key], rtol=0, atol=0)
    assert loaded.decoder.lm_head.weight is loaded.encoder.token_embed.weight  # still tied
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "int8" / "model.safetensors")
    up = [n for n in int8.embeddings(quantized) if n.endswith("kv_b_proj")]
    assert up and all(stored[f"{n}.weight.int8"].dtype == torch.int8 for n in up)  # runs in float, stored as int8
    for n in up:  # the model in memory is the one the file holds
        torch.testing.assert_close(loaded.get_submodule(n).weight, quantized.get_submodule(n).weight, rtol=0, atol=0)
    assert int8.parameter_count(loaded) == int8.parameter_count(float_model)
    torch.manual_seed(0)
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(4, 60, (4, 9))
    with torch.no_grad():
        ours = loaded(images, ids)
        torch.testing.assert_close(ours.logits, quantized(images, ids).logits)  # loaded == saved
        reference = float_model(images, ids)
    cosine = torch.nn.functional.cosine_similarity(ours.image_embeds, reference.image_embeds, dim=-1)
    assert cosine.min() > 0.98
    size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert size < 0.4 * (resolve_checkpoint(tiny_run[0]) / "model.safetensors").stat().st_size  # measured 0.345


def test_the_commands_run_an_int8_model(tiny_run, compressed, capsys):
    images = sorted(str(p) for p in (tiny_run[1] / "images").glob("*.png"))[:2]
    assert main(["caption", *images, "--checkpoint", str(compressed), "--json"]) == 0
    assert all(row["caption"] for row in json.loads(capsys.readouterr().out))
    assert main(["ask", images[0], "what color is the shape?", "--checkpoint", str(compressed), "--json"]) == 0


def test_bad_input_is_one_line_and_nothing_is_written(tiny_run, compressed, tmp_path, capsys, monkeypatch):
    assert main(["compress", str(tiny_run[0]), str(tmp_path / "a")]) == 2
    assert "choose a compression: --int8" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["compress", str(tiny_run[0]), str(tmp_path / "full"), "--int8"]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "not-a-model").mkdir()
    assert main(["compress", str(tmp_path / "not-a-model"), str(tmp_path / "b"), "--int8"]) == 2
    assert main(["compress", str(compressed), str(tmp_path / "c"), "--int8"]) == 2
    assert "already compressed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "not-a-model"]  # no partial folder left
    other = tmp_path / "other"
    shutil.copytree(compressed, other)
    config = json.loads((other / int8.QUANT_FILE).read_text())
    config["modules"][0] = "encoder.blocks.9.attn.q_proj"
    (other / int8.QUANT_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not a Linear layer of this model"):
        MLMModel.from_pretrained(str(other))
    monkeypatch.setattr(inference, "pick_device", lambda device=None: torch.device("cuda"))
    with pytest.raises(ValueError, match="INT8 model, which runs on the CPU"):
        inference.load_model(compressed, "cuda")


def test_bench_compress_measures_float_and_int8(tiny_run, tmp_path):
    out = tmp_path / "compress.json"
    argv = ["bench", "compress", "--checkpoint", str(tiny_run[0]), "--data", str(tiny_run[1]), "--threads", "1"]
    argv += ["--variants", "int8-torchao,int8-fbgemm"]  # onnx: the slow test in test_runtime_onnx.py
    assert main([*argv, "--repeats", "1", "--batch-size", "4", "--max-samples", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["float", "int8-torchao", "int8-fbgemm"]
    keys = {"size_bytes", "size_ratio", "params", "caption_s_1t", "caption_s_1t_ratio", "embed_s_1t", "t2i_R@1",
            "vqa", "CIDEr", "vqa_delta"}  # fmt: skip
    assert all(keys <= set(r) for r in report["rows"])
    assert report["rows"][0]["size_ratio"] == 1.0 and all(r["size_ratio"] < 0.4 for r in report["rows"][1:])


def test_bench_compress_adds_pruned_and_student_rows(tiny_run, tmp_path):
    run, synth = tiny_run
    pruned = tmp_path / "pruned"
    calib = ["--calib", str(synth), "--calib-batches", "1", "--calib-batch-size", "8"]
    assert main(["compress", str(run), str(pruned), "--prune-ffn", "0.5", "--prune-heads", "0.5", *calib]) == 0
    out = tmp_path / "compress.json"
    argv = ["bench", "compress", "--checkpoint", str(run), "--data", str(synth), "--threads", "1", "--variants", ""]
    argv += ["--pruned-checkpoint", str(pruned), "--student-checkpoint", str(run)]
    assert main([*argv, "--repeats", "1", "--batch-size", "4", "--max-samples", "8", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["float", "pruned", "pruned-int8", "student"]
    assert rows["pruned"]["params"] < rows["float"]["params"] and rows["student"]["size_ratio"] == 1.0
    assert rows["pruned-int8"]["size_bytes"] < 0.4 * rows["pruned"]["size_bytes"]
