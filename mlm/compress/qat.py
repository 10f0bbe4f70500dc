"""Quantization-aware training (``train.qat``): torchao's fake quantization in the layers INT8 quantizes.

Every Linear layer that ``mlm compress --int8`` quantizes (:func:`mlm.compress.int8.quantizable`) becomes torchao's
``FakeQuantizedLinear``: its forward rounds the weights to int8 per output row (symmetric) and its inputs to int8 per
token (asymmetric, the per-token scheme torchao's fake quantizer has), and the gradient passes the rounding unchanged
(straight-through estimator), so training adapts the weights to the rounding INT8 inference will do. The layers keep
their parameter names, so checkpoints hold float weights that load anywhere; ``mlm compress RUN OUT --int8`` then
converts them with the same input scheme (it reads ``train.qat`` from the run's config), so the INT8 Linear layers
compute what training saw (tested equal). The token embedding and the patch convolution, which INT8 stores with one
scale per row and runs in float, are rounded at conversion only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

ACTIVATIONS = "asymmetric"  # the input scheme QAT trains with and its INT8 conversion uses


def prepare_qat(model: nn.Module) -> list[str]:
    """Put fake quantization into the INT8-quantizable Linear layers of ``model`` in place; return their names."""
    from mlm.compress.int8 import _drop_enum_notice, quantizable

    names = set(quantizable(model))
    logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_notice)
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        raise ValueError("train.qat needs torchao: pip install -e '.[compress]'") from None
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    config = QATConfig(activation_config=activations, weight_config=weights, step="prepare")
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names and type(module) is nn.Linear)
    return sorted(names)


def is_qat(model: nn.Module) -> bool:
    """True when some layer of ``model`` runs with fake quantization."""
    return any(hasattr(m, "weight_fake_quantizer") for m in model.modules())
