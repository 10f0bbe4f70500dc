"""``mlm export onnx``: a float model as three ONNX graphs (torch.onnx's dynamo exporter), checked with ONNX Runtime.

The folder holds ``image.onnx``, ``text.onnx`` and ``decoder_step.onnx`` (see :mod:`mlm.runtime.graphs`; with word
grounding the image graph also gives its word maps and the step carries its running state), the
model's ``config.json``, ``generation_config.json`` and ``tokenizer.json``, and ``onnx_config.json``: the graphs'
input and output names, the step's cache length and the fingerprint of the weights, which every graph also carries in
its metadata, so a graph from another model is refused by name. Before anything is kept, every graph is run by ONNX
Runtime on the example inputs and at a second batch size, and must match PyTorch within ``tolerance``; the folder is
written to a temporary sibling and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlm.runtime.graphs import ImageGraph, StepGraph, TextGraph, exportable
from mlm.runtime.onnx_int8 import WEIGHTS_FILE

FORMAT = "mlm-onnx"
MANIFEST = "onnx_config.json"
GRAPHS = {
    "image": (["images"], ["image_embeds", "context_0", "context_1"]),
    "text": (["text_ids", "text_mask"], ["text_embeds"]),
    "decoder_step": (
        ["ids", "position", "encoder_0", "encoder_1", "decoder_0", "decoder_1", "context_0", "context_1"],
        ["logits", "new_encoder_0", "new_encoder_1", "new_decoder_0", "new_decoder_1"],
    ),
}
CACHE_INPUTS = ("encoder_0", "encoder_1", "decoder_0", "decoder_1")
GROUND_IMAGE = ["ground_maps", "ground_values"]  # word grounding: per image, from the image graph
GROUND_STATE = ["ground_sums", "ground_norm"]  # ... and its running state, in and out of every step


def graph_names(config) -> dict[str, tuple[list[str], list[str]]]:
    """Each graph's input and output names for a model config (word grounding adds its inputs and state)."""
    if not config.decoder_grounding:
        return GRAPHS
    (image_in, image_out), (step_in, step_out) = GRAPHS["image"], GRAPHS["decoder_step"]
    return {
        "image": (image_in, image_out + GROUND_IMAGE),
        "text": GRAPHS["text"],
        "decoder_step": (step_in + GROUND_IMAGE + GROUND_STATE, step_out + [f"new_{n}" for n in GROUND_STATE]),
    }


def cache_inputs(config) -> list[str]:
    """The step's inputs that it returns updated: the self-attention caches and any grounding state."""
    return list(CACHE_INPUTS) + (GROUND_STATE if config.decoder_grounding else [])


def batch_axis(name: str) -> int:
    """The batch axis of a step input: the stacked caches and contexts have one per layer in front."""
    return 0 if name.startswith("ground_") or name == "ids" else 1


def check_exportable(model) -> None:
    """Raise ValueError naming why a model cannot be exported (INT8, LoRA adapters, a short convolution, not on the
    CPU)."""
    from mlm.compress.int8 import is_quantized
    from mlm.lora import has_lora

    if is_quantized(model):
        raise ValueError("this is an INT8 model (mlm compress); export the float checkpoint it was made from")
    if has_lora(model):
        raise ValueError("this model has LoRA adapters; merge them first (mlm export CKPT --out DIR --merge-lora)")
    if model.config.decoder_short_conv:
        raise ValueError("model.decoder_short_conv: the step graph does not carry the convolution's history yet")
    if model.device.type != "cpu":
        raise ValueError(f"export runs on the CPU; the model is on {model.device}")


def _examples(model, graphs: dict, batch: int, total_len: int, seed: int = 0) -> dict[str, tuple]:
    """Example inputs of each graph for a batch (random pixels and ids; the step at a middle position)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    images = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=generator)
    length = min(5, cfg.max_text_len)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length // 2 + 1 :] = False  # one padded row
    names = graph_names(cfg)
    given = dict(zip(names["image"][1], graphs["image"](images), strict=True))
    given.update(graphs["decoder_step"].empty_caches(batch))
    for name in cache_inputs(cfg):
        given[name].normal_(generator=generator)
    given.update(ids=ids[:, :1], position=torch.tensor(min(3, total_len - 1)))
    step = tuple(given[n] for n in names["decoder_step"][0])
    return {"image": (images,), "text": (ids, mask), "decoder_step": step}


def _dynamic_shapes(model) -> dict[str, list]:
    """The batch axis of every input is dynamic, and the text graph's length (up to model.max_text_len)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    length = Dim("length", min=1, max=model.config.max_text_len)
    step = [{} if name == "position" else {batch_axis(name): batch} for name in graph_names(model.config)[
        "decoder_step"][0]]  # fmt: skip
    # StepGraph.forward takes the grounding's inputs as *grounding: one element of the signature
    step = step[:8] + [tuple(step[8:])] if len(step) > 8 else step
    return {"image": [{0: batch}], "text": [{0: batch, 1: length}, {0: batch, 1: length}], "decoder_step": step}


def _finish(folder: Path, fingerprint: str, int8: bool) -> None:
    """Stamp each graph with the weights' fingerprint, optionally make its weights INT8, and move the weights of
    all three into one shared file (:mod:`mlm.runtime.onnx_int8`)."""
    import onnx

    from mlm.runtime.onnx_int8 import quantize_weights, share_weights

    models = {}
    for name in GRAPHS:
        graph = onnx.load(str(folder / f"{name}.onnx"))
        graph = quantize_weights(graph) if int8 else graph
        for node in graph.graph.node:  # the exporter's per-node stack traces were most of a graph's bytes
            for field in ("metadata_props", "doc_string", "name"):
                node.ClearField(field)
        graph.graph.ClearField("value_info")  # intermediate shapes: ONNX Runtime infers them again
        entry = graph.metadata_props.add()
        entry.key, entry.value = "mlm_fingerprint", fingerprint
        models[name] = graph
    share_weights(models, folder)


def _largest_difference(path: Path, names: list[str], inputs: tuple, expected) -> float:
    """Run one graph with ONNX Runtime and return its largest absolute difference to PyTorch's outputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in zip(names, inputs, strict=True)})
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float((torch.from_numpy(g) - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))


def _check(path: Path, name: str, inputs: list[str], samples: list, tolerance: float | None) -> float:
    """The graph's largest difference to PyTorch over the samples; ValueError when it exceeds ``tolerance``."""
    difference = max(_largest_difference(path, inputs, given, expected) for given, expected in samples)
    if tolerance is not None and not difference <= tolerance:
        raise ValueError(f"{name}.onnx differs from PyTorch by {difference:.2e} (> {tolerance:g})")
    return difference


@torch.no_grad()
def export_onnx(
    model, out: str | Path, *, total_len: int | None = None, tolerance: float = 1e-4, int8: bool = False
) -> dict:
    """Write the three graphs and their manifest into ``out`` (new or empty); return the manifest. With ``int8``
    the graphs' weights are INT8 (:mod:`mlm.runtime.onnx_int8`); their differences to the float model are
    recorded, and the float graphs are checked against ``tolerance`` before they are quantized."""
    from mlm.inference import model_fingerprint
    from mlm.model_files import config_json
    from mlm.run_folder import check_new_folder, write_folder

    check_exportable(model)
    out = check_new_folder(out)
    total_len = total_len or model.config.max_text_len + model.generation_config.max_new_tokens
    if total_len < 2:
        raise ValueError(f"--max-len {total_len}: the decoder step needs room for at least 2 tokens")
    fingerprint = model_fingerprint(model)  # of the model as loaded (the copy below renames some keys)
    model = exportable(model.eval())
    graphs = {"image": ImageGraph(model), "text": TextGraph(model), "decoder_step": StepGraph(model, total_len)}
    names, manifest = graph_names(model.config), {}

    def fill(tmp: Path) -> None:
        examples, shapes, checks = _examples(model, graphs, 2, total_len), _dynamic_shapes(model), {}
        others = _examples(model, graphs, 3, total_len, seed=1)
        examples_of = {name: [(sample[name], graph(*sample[name])) for sample in (examples, others)]
                       for name, graph in graphs.items()}  # fmt: skip
        for name, graph in graphs.items():
            inputs, outputs = names[name]
            path = tmp / f"{name}.onnx"
            torch.onnx.export(graph, examples[name], str(path), dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=shapes[name], external_data=False, verbose=False)  # fmt: skip
            if int8:  # the float graph must be right before its weights are rounded
                _check(path, name, inputs, examples_of[name], tolerance)
        _finish(tmp, fingerprint, int8)
        for name, (inputs, _) in names.items():
            checks[name] = _check(tmp / f"{name}.onnx", name, inputs, examples_of[name], None if int8 else tolerance)
        manifest.update(
            format=FORMAT,
            version=1,
            fingerprint=fingerprint,
            total_len=total_len,
            attention=model.config.attention,
            graphs={name: {"file": f"{name}.onnx", "inputs": i, "outputs": o} for name, (i, o) in names.items()},
            max_abs_difference=checks,
            weights={"file": WEIGHTS_FILE, "int8": int8},
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_json(model.config), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(model.generation_config.to_dict(), indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer.json")

    write_folder(out, fill)
    return manifest
