"""Weight initialisation of the model's linear layers (``model.init_std``).

With ``init_std`` > 0 every ``nn.Linear`` weight is drawn from a normal truncated at two standard deviations and
every bias is zero, as timm's ViT and HF transformers' ``initializer_range`` (0.02) do; torch's own default is
Kaiming-uniform, std 1/sqrt(3 * fan_in) (0.051 at width 128). Layers that start at zero on purpose (position
values, exit lenses) keep their zeros.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_linears(module: nn.Module, std: float) -> int:
    """Re-draw the weights of every non-zero ``nn.Linear`` under ``module``; returns how many were drawn."""
    drawn = 0
    for layer in module.modules():
        if not isinstance(layer, nn.Linear) or not layer.weight.any():
            continue
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        drawn += 1
    return drawn
