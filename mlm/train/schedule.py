"""Optimiser and learning-rate schedule: AdamW with decoupled weight decay (Loshchilov & Hutter 2019) and a linear
warmup followed by a cosine decay to zero (transformers' ``get_cosine_schedule_with_warmup``).

Weight decay skips norms, biases, embeddings and the logit scale/bias, as in open_clip and nanoGPT: shrinking a
gain, an offset, a lookup row or a temperature towards zero regularises nothing useful.
"""

from __future__ import annotations

import torch
from torch import nn

from mlm.config import TrainConfig

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """True for parameters that weight decay should leave alone."""
    kind = type(module).__name__.lower()  # also catches project classes such as RMSNorm or ModalityEmbedding
    if param.ndim < 2 or isinstance(module, _NO_DECAY_MODULES) or "norm" in kind or "embedding" in kind:
        return True
    # Directly owned tensors such as ``pos_embed`` or ``modality_embed`` (not the weight of a Linear/Conv).
    return "embed" in name or "logit" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group (norms/biases/embeddings)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue  # tied weights appear under two modules; the first owner decides
            seen.add(id(param))
            (no_decay if _is_no_decay(module, name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``train.lr``, ``train.betas`` and ``train.weight_decay``."""
    if len(train.betas) != 2:
        raise ValueError(f"train.betas={train.betas} must hold two numbers, e.g. [0.9, 0.98]")
    # The fused kernel exists on CUDA only; foreach is the fast path on CPU.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas), eps=1e-6, fused=fused or None
    )


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``train.warmup_steps`` then cosine decay to 0 at ``train.max_steps``."""
    from transformers import get_cosine_schedule_with_warmup

    if train.warmup_steps < 0 or train.max_steps <= 0:
        raise ValueError(
            f"train.warmup_steps={train.warmup_steps} must be >= 0 and train.max_steps={train.max_steps} > 0"
        )
    return get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, train.max_steps)
