"""INT8 weights for the exported graphs (``mlm export onnx --int8``) and one weights file shared by all three.

Every matrix product with a constant weight becomes ONNX Runtime's ``MatMulNBits`` at 8 bits (its maintained
weight-only quantizer, ``onnxruntime.quantization.matmul_nbits_quantizer``: symmetric, one scale per 128 input rows
of each column, or per 64, 32 or 16 where the input is narrower), so the weights stay int8 in memory and the kernel
dequantizes them block by block; activations stay fp32. Dynamic activation quantization (``quantize_dynamic``)
was tried first: its one scale per tensor lets one outlier patch coarsen a whole batch, and it changed the demo
model's captions. The other float weights (the patch convolution, the pooler's projection, the token embedding) are
stored as int8 with one scale per output row and a ``DequantizeLinear`` in front, as ``mlm compress --int8`` stores
them.

The three graphs hold many of the same tensors (the text blocks are in ``text.onnx`` and in ``decoder_step.onnx``);
:func:`share_weights` writes each distinct tensor once into ``weights.bin`` as ONNX external data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights.bin"
BLOCK_SIZES = (128, 64, 32, 16)  # input rows per scale, the longest that divides each weight's; 16 pads the rest
MIN_ELEMENTS = 1024  # smaller tensors (norm weights, biases) stay float
MIN_SHARED_BYTES = 64  # tensors of at least this size go to the weights file (each distinct one once)
_ALIGN = 64


def quantize_weights(model):
    """Return an ONNX ``ModelProto`` with INT8 weights (see the module docstring); ``model`` is consumed."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quantizer_log.level = quantizer_log.level, logging.WARNING  # it logs every node it skips at INFO
    try:
        for block in BLOCK_SIZES:  # the longest block that divides a weight's input dimension: fewest scales
            inputs = _matmul_inputs(model)
            narrower = [name for name, k in inputs.items() if k % block]
            quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block, is_symmetric=True,
                                             nodes_to_exclude=narrower)  # fmt: skip
            quantizer.process()
            model = quantizer.model.model
    finally:
        quantizer_log.setLevel(level)
    _rows_as_int8(model)
    return model


def _matmul_inputs(model) -> dict[str, int]:
    """Input dimension K of every MatMul node whose weight (K, N) is an initializer."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = (n for n in model.graph.node if n.op_type == "MatMul" and len(weights.get(n.input[1], ())) == 2)
    return {node.name: weights[node.input[1]][0] for node in nodes}


# where a weight is read: the weight input of a product, or a re-layout on the way to one (the absorbed decode's
# per-head splits); a parameter read by Gather is the token embedding. Tables (RoPE angles, positions, additive masks)
# are read elsewhere and stay float.
_WEIGHT_USES = {("Conv", 1), ("Gemm", 1), ("MatMul", 1), ("Einsum", 0), ("Einsum", 1), ("Split", 0), ("Transpose", 0)}


def _weights(graph) -> set[str]:
    """Names of the float initializers that only products (or the token embedding's Gather) read."""
    uses: dict[str, set] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, index))
    return {name for name, used in uses.items()
            if used <= _WEIGHT_USES | ({("Gather", 0)} if name.startswith("model.") else set())}  # fmt: skip


def _rows_as_int8(model) -> None:
    """Store each remaining float weight of >= MIN_ELEMENTS as int8 rows with a scale, dequantized in the graph."""
    from onnx import TensorProto, helper, numpy_helper

    graph, nodes, weights = model.graph, [], _weights(model.graph)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type != TensorProto.FLOAT or tensor.name not in weights or np.prod(tensor.dims) < MIN_ELEMENTS:
            continue
        weight = numpy_helper.to_array(tensor)
        rows = weight.reshape(weight.shape[0], -1)
        scale = np.maximum(np.abs(rows).max(axis=1), 1e-12) / 127.0
        codes = np.clip(np.round(rows / scale[:, None]), -127, 127).astype(np.int8).reshape(weight.shape)
        name = tensor.name
        graph.initializer[index].CopyFrom(numpy_helper.from_array(codes, f"{name}_int8"))
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name], axis=0,
                                      name=f"{name}_dequantize"))  # fmt: skip
    for node in reversed(nodes):  # before every use
        graph.node.insert(0, node)


def share_weights(models: dict, folder: Path) -> None:
    """Move every raw initializer of the ``name -> ModelProto`` graphs into ``folder/weights.bin``, each distinct
    tensor once, and save each graph as ``folder/<name>.onnx`` pointing at it."""
    import onnx
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    offsets: dict[str, tuple[int, int]] = {}
    weight_types = {TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8}  # int64 shapes stay: shape inference
    with open(folder / WEIGHTS_FILE, "wb") as file:
        for model in models.values():
            for tensor in model.graph.initializer:
                data = tensor.raw_data
                if len(data) < MIN_SHARED_BYTES or tensor.data_type not in weight_types:
                    continue
                key = hashlib.sha256(data + repr((tensor.data_type, list(tensor.dims))).encode()).hexdigest()
                if key not in offsets:
                    file.write(b"\0" * (-file.tell() % _ALIGN))
                    offsets[key] = (file.tell(), len(data))
                    file.write(data)
                set_external_data(tensor, WEIGHTS_FILE, *offsets[key])
                tensor.data_location = TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
    for name, model in models.items():
        onnx.save(model, str(folder / f"{name}.onnx"))


def folder_bytes(folder: Path) -> int:
    """Bytes of an export's graphs and weights (what a deployment ships besides config and tokenizer)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix == ".onnx" or p.name == WEIGHTS_FILE)
