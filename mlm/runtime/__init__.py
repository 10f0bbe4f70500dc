"""Other runtimes for a trained model: ONNX graphs (:mod:`mlm.runtime.graphs`), their export
(:mod:`mlm.runtime.onnx_export`) and an ONNX Runtime model that embeds and captions (:mod:`mlm.runtime.onnx_model`).
"""
