"""ONNX export: the graphs equal the model (PyTorch and ONNX Runtime), captions match, bad input is one line."""

import json

import pytest
import torch

from mlm import inference
from mlm.cli import main
from mlm.runtime.graphs import ImageGraph, StepGraph, TextGraph, exportable
from mlm.runtime.onnx_export import cache_inputs, graph_names
from tests.test_model import tiny_model

GROUNDED = ["model.decoder_grounding=2", "model.word_head=true", "model.word_head_patches=true"]
VARIANTS = [
    [],
    ["model.cross_null=true", "model.cross_pos_keys=true", "model.cross_pos_values=true"],
    ["model.cross_query_gain=2.0"],
    ["model.levels=[local,regional,global]", "model.top_k=3"],
    ["model.attention=mha"],
    ["model.attention=gqa", "model.mla.n_kv_heads=1"],
    GROUNDED,
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "mla")
@torch.no_grad()
def test_fixed_length_step_equals_cached_decoding_step_by_step(overrides):
    torch.manual_seed(0)
    model = exportable(tiny_model(*overrides))
    if model.decoder.grounding is not None:  # a fresh projection adds nothing: the state would go untested
        model.decoder.grounding.out.weight.normal_(0, 0.5)
    images, length = torch.randn(2, 3, 16, 16), 10
    cache = model.start_decoding(model.encoder.encode_image(images).tokens, length)
    step, names = StepGraph(model, length), graph_names(model.config)
    given = dict(zip(names["image"][1], ImageGraph(model)(images), strict=True))
    caches = step.empty_caches(2)
    assert list(caches) == cache_inputs(model.config)
    ids = torch.randint(4, 48, (2, length))
    previous = None
    for position in range(length):
        expected = model.decode_step(ids[:, position : position + 1], cache)[:, -1]
        given.update(caches, ids=ids[:, position : position + 1], position=torch.tensor(position))
        logits, *updated = step(*(given[name] for name in names["decoder_step"][0]))
        caches = dict(zip(caches, updated, strict=True))
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert previous is None or not torch.allclose(logits, previous)  # each step sees its own position
        previous = logits


@torch.no_grad()
def test_image_and_text_graphs_equal_the_model_with_padding():
    torch.manual_seed(0)
    model = tiny_model("model.cross_null=true", "model.cross_pos_keys=true")
    copy = exportable(model)
    assert "pooler.scorers.global_.0.weight" in copy.state_dict()  # re-keyed: "global" breaks torch.export's code
    images, ids = torch.randn(3, 3, 16, 16), torch.randint(4, 48, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    embeds, context_0, context_1 = ImageGraph(copy)(images)
    torch.testing.assert_close(embeds, model.image_features(images).embeds)
    contexts = model.decoder.encode_contexts(model.encoder.encode_image(images).tokens)
    torch.testing.assert_close(context_0, torch.stack([c.c_kv for c in contexts]))
    torch.testing.assert_close(context_1, torch.stack([c.k_rope for c in contexts]))
    torch.testing.assert_close(TextGraph(copy)(ids, mask), model.text_features(ids, mask).embeds)


def test_models_that_cannot_be_exported_are_named(tiny_run, tmp_path, capsys):
    from mlm.compress import int8

    model = inference.load_model(tiny_run[0], "cpu")
    int8.quantize_int8(model, engine="fbgemm")
    model.save_pretrained(tmp_path / "int8")
    assert main(["export", "onnx", str(tmp_path / "int8"), str(tmp_path / "out")]) == 2
    assert "INT8 model" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["export", "onnx", str(tiny_run[0])]) == 2
    assert "usage: mlm export" in capsys.readouterr().err
    assert main(["caption", "x.png", "--runtime", "onnx", "--checkpoint", str(tiny_run[0])]) == 2
    assert "not an ONNX export" in capsys.readouterr().err
    conv = tiny_model(
        "model.decoder_short_conv=4", f"model.vocab_size={len(model.tokenizer)}", tokenizer=model.tokenizer
    )
    conv.save_pretrained(tmp_path / "conv")
    assert main(["export", "onnx", str(tmp_path / "conv"), str(tmp_path / "out")]) == 2
    assert "model.decoder_short_conv" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "graphs"
    assert main(["export", "onnx", str(tiny_run[0]), str(out), "--max-len", "24"]) == 0
    return out


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch_and_captions_the_same(tiny_run, exported, capsys):
    from mlm.runtime.onnx_model import load_onnx_model

    manifest = json.loads((exported / "onnx_config.json").read_text())
    assert manifest["total_len"] == 24 and max(manifest["max_abs_difference"].values()) <= 1e-4
    model, graphs = inference.load_model(tiny_run[0], "cpu"), load_onnx_model(exported)
    torch.manual_seed(0)
    images = torch.randn(3, 3, model.config.image_size, model.config.image_size)
    ids = torch.randint(4, model.config.vocab_size, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(graphs.encode_image(images), model.encode_image(images, normalize=True), atol=1e-4,
                                   rtol=0)  # fmt: skip
        torch.testing.assert_close(graphs.encode_text(ids), model.encode_text(ids, normalize=True), atol=1e-4, rtol=0)
        for kwargs in ({}, {"num_beams": 3}, {"max_new_tokens": 5, "min_new_tokens": 5}):
            assert graphs.generate(images, **kwargs) == model.generate(images, **kwargs)
        prompt = {"prompt": "question: what color? answer:", "max_new_tokens": 8}
        assert graphs.generate(images, **prompt) == model.generate(images, **prompt)
    pictures = sorted((tiny_run[1] / "images").glob("*.png"))[:3]
    args = ["caption", *map(str, pictures), "--json", "--checkpoint"]
    assert main([*args, str(tiny_run[0])]) == 0
    torch_rows = json.loads(capsys.readouterr().out)
    assert main([*args, str(exported), "--runtime", "onnx"]) == 0
    assert json.loads(capsys.readouterr().out) == torch_rows


@pytest.mark.slow
def test_a_graph_from_another_model_or_too_long_a_decoding_is_refused(exported, tmp_path, capsys):
    import shutil

    from mlm.runtime.onnx_model import load_onnx_model

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    manifest = json.loads((copy / "onnx_config.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (copy / "onnx_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="image.onnx: made from another model"):
        load_onnx_model(copy)
    graphs = load_onnx_model(exported)
    with pytest.raises(ValueError, match="exported for 24"):
        graphs.generate(torch.zeros(1, 3, graphs.config.image_size, graphs.config.image_size), max_new_tokens=30)
    assert main(["export", "onnx", str(exported), str(tmp_path / "again")]) == 2  # an export is not a checkpoint
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "again").exists()


@pytest.mark.slow
def test_bench_compress_has_an_onnx_row_with_the_float_quality(tiny_run, tmp_path):
    out = tmp_path / "compress.json"
    argv = ["bench", "compress", "--checkpoint", str(tiny_run[0]), "--data", str(tiny_run[1]), "--threads", "1"]
    argv += ["--variants", "onnx,onnx-int8", "--repeats", "1", "--batch-size", "4", "--max-samples", "8"]
    argv += ["--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["float", "onnx", "onnx-int8"]
    assert rows[1]["caption_s_1t"] > 0 and abs(rows[1]["t2i_R@1_delta"]) < 1e-6 and rows[1]["vqa_delta"] == 0
    # the weights once (graph structure is a large share of so small a model), then as int8
    assert rows[1]["size_ratio"] < 2.0 and rows[2]["size_bytes"] < 0.6 * rows[1]["size_bytes"]
    assert main([*argv[:-2], "--variants", "fp8"]) == 2
    model = inference.load_model(tiny_run[0], "cpu")
    conv = tiny_model(
        "model.decoder_short_conv=4", f"model.vocab_size={len(model.tokenizer)}", tokenizer=model.tokenizer
    )
    conv.save_pretrained(tmp_path / "conv")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "conv")
    assert main(argv) == 0  # a model the exporter refuses: its ONNX rows are skipped, with the reason
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["float"]
    assert "model.decoder_short_conv" in report["skipped"]["onnx"]


@pytest.mark.slow
def test_a_model_with_word_grounding_exports_and_decodes_as_pytorch(tiny_run, tmp_path):
    from mlm.runtime.onnx_model import load_onnx_model

    tokenizer = inference.load_model(tiny_run[0], "cpu").tokenizer
    torch.manual_seed(0)
    model = tiny_model(*GROUNDED, f"model.vocab_size={len(tokenizer)}", tokenizer=tokenizer).eval()
    with torch.no_grad():  # a trained projection: a fresh one adds nothing, so the state would go untested
        model.decoder.grounding.out.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "grounded")
    assert main(["export", "onnx", str(tmp_path / "grounded"), str(tmp_path / "out"), "--max-len", "16"]) == 0
    manifest = json.loads((tmp_path / "out" / "onnx_config.json").read_text())
    assert "ground_sums" in manifest["graphs"]["decoder_step"]["inputs"]
    assert max(manifest["max_abs_difference"].values()) <= 1e-4
    loaded, graphs = inference.load_model(tmp_path / "grounded", "cpu"), load_onnx_model(tmp_path / "out")
    images = torch.randn(3, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        for kwargs in ({"max_new_tokens": 6, "min_new_tokens": 6}, {"max_new_tokens": 6, "num_beams": 3}):
            assert graphs.generate(images, **kwargs) == loaded.generate(images, **kwargs)


def _graph(weight, table, name: str):
    """A graph ``(x @ weight + table[ids]) * 2`` with the weight, an embedding table and an additive float table."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Gather", ["model.embed", "ids"], ["e"]),
        helper.make_node("Add", ["xw", "e"], ["s"]),
        helper.make_node("Add", ["s", "table"], ["y"]),
    ]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(weight.T.copy(), "model.embed"),
             numpy_helper.from_array(table, "table")]  # fmt: skip
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64]),
                      helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_int8_weights_are_shared_once_and_tables_stay_float(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime

    from mlm.runtime.onnx_int8 import WEIGHTS_FILE, quantize_weights, share_weights

    rng = np.random.default_rng(0)
    weight, table = rng.normal(size=(64, 64)).astype(np.float32), rng.normal(size=(1, 64)).astype(np.float32)
    x, ids = rng.normal(size=(3, 64)).astype(np.float32), np.array([0, 5, 63])
    expected = x @ weight + weight.T[ids] + table
    float_dir, int8_dir = tmp_path / "float", tmp_path / "int8"
    float_dir.mkdir(), int8_dir.mkdir()
    share_weights({"a": _graph(weight, table, "a"), "b": _graph(weight, table, "b")}, float_dir)
    assert (float_dir / WEIGHTS_FILE).stat().st_size < 2 * weight.nbytes + 1024  # w and its transpose, once each
    int8 = quantize_weights(_graph(weight, table, "a"))
    ops = {node.op_type for node in int8.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops and "DequantizeLinear" in ops  # the embedding: int8 rows
    kept = next(t for t in int8.graph.initializer if t.name == "table")  # a table, not a weight: unchanged
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept), table)
    share_weights({"a": int8}, int8_dir)
    assert (int8_dir / WEIGHTS_FILE).stat().st_size < 0.35 * (float_dir / WEIGHTS_FILE).stat().st_size
    for folder, tolerance in ((float_dir, 1e-6), (int8_dir, 0.02)):
        session = onnxruntime.InferenceSession(str(folder / "a.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x, "ids": ids})[0]
        np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(expected).max(), rtol=0)


@pytest.mark.slow
def test_an_int8_export_embeds_and_captions_close_to_the_float_model(tiny_run, tmp_path, capsys):
    import torch.nn.functional as F

    from mlm.run_folder import resolve_checkpoint
    from mlm.runtime.onnx_int8 import folder_bytes
    from mlm.runtime.onnx_model import load_onnx_model

    out = tmp_path / "int8"
    assert main(["export", "onnx", str(tiny_run[0]), str(out), "--int8", "--max-len", "24"]) == 0
    assert "INT8 weights in weights.bin" in capsys.readouterr().out
    manifest = json.loads((out / "onnx_config.json").read_text())
    assert manifest["weights"] == {"file": "weights.bin", "int8": True}
    model, graphs = inference.load_model(tiny_run[0], "cpu"), load_onnx_model(out)
    weights = resolve_checkpoint(tiny_run[0]) / "model.safetensors"
    assert (out / "weights.bin").stat().st_size < 0.45 * weights.stat().st_size  # small tensors and tables: float
    assert folder_bytes(out) > (out / "weights.bin").stat().st_size
    torch.manual_seed(0)
    images = torch.randn(4, 3, model.config.image_size, model.config.image_size)
    ids = torch.randint(4, model.config.vocab_size, (4, 6))
    with torch.no_grad():
        image = F.cosine_similarity(graphs.encode_image(images), model.encode_image(images, normalize=True))
        text = F.cosine_similarity(graphs.encode_text(ids), model.encode_text(ids, normalize=True))
        assert image.min() > 0.99 and text.min() > 0.99
        assert all(isinstance(c, str) for c in graphs.generate(images, max_new_tokens=6))
    assert main(["export", str(tiny_run[0]), "--out", str(tmp_path / "x"), "--int8"]) == 2
    assert "--int8 applies to mlm export onnx only" in capsys.readouterr().err
