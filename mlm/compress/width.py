"""Width pruning: the residual stream's channels (``model.dim``), ranked by their importance on calibration data.

Minitron (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge Distillation") prunes a
trained model's embedding channels and recovers it by distillation, which trains a small model much better than
starting it from scratch. A channel is one coordinate of the residual stream: a column of the token and modality
embeddings, a row of the patch projection and of every output projection that writes the stream, a column of every
projection that reads it, an entry of every RMSNorm. Its importance is the first-order estimate of the loss change
when it is removed, |Σ W ∂L/∂W| over all those entries (the same estimate :mod:`mlm.compress.prune` uses for heads
and feed-forward channels), averaged over calibration batches.

Which axes are the residual stream's is read from the model itself: the pruned config differs from the original in
``model.dim`` alone (the feed-forward width is written out, so it does not follow ``dim``), and every parameter axis
of size ``dim`` in the original and of the new width in a model built from that config is one; an axis that shrinks
by a multiple g of the width change holds g copies of the stream and then entries of its own (the word grounding's
projection of its heads' reads and scores). Every other axis keeps its size. The fixed sin-cos position tables
follow the new width (they are rebuilt from the config), which the fine-tuning or distillation after pruning adapts
to.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mlm.compress.prune import backward_passes, best, check_ratio, kept, targets
from mlm.layers.mlp import SwiGLU


def narrower_config(model: nn.Module, ratio: float):
    """The model's config with the share ``ratio`` of ``dim`` removed and its feed-forward width written out."""
    check_ratio("--prune-dim", ratio)
    cfg = copy.deepcopy(model.config)
    cfg.ffn_hidden_dim = next(m for m in model.modules() if isinstance(m, SwiGLU)).fc2.in_features
    cfg.dim = kept(cfg.dim, ratio)
    return cfg


def residual_axes(model: nn.Module, narrow: nn.Module) -> dict[str, list]:
    """Per parameter name of ``model``, its axes that are the residual stream (size ``dim`` there and the narrower
    width in ``narrow``): an int, or (axis, g) for an axis that holds g consecutive copies of the stream and then
    entries of their own (the heads' reads a word-grounding projection takes); raises ValueError when any other axis
    differs."""
    targets(model)  # a model with LoRA adapters: merge them first (one clear line)
    wide_dim, narrow_dim = model.config.dim, narrow.config.dim
    small = dict(narrow.named_parameters())
    axes = {}
    for name, p in model.named_parameters():
        if name not in small:
            raise ValueError(f"the narrower model has no parameter {name}")
        q = small[name]
        found = []
        for a, (n, m) in enumerate(zip(p.shape, q.shape, strict=True)):
            if n == m:
                continue
            copies = (n - m) // (wide_dim - narrow_dim)
            if (n, m) == (wide_dim, narrow_dim):
                found.append(a)
            elif (n - m) % (wide_dim - narrow_dim) == 0 and n - copies * wide_dim >= 0:
                found.append((a, copies))
            else:
                raise ValueError(f"{name}: {tuple(p.shape)} -> {tuple(q.shape)} is not a change of model.dim alone")
        if found:
            axes[name] = found
    return axes


def _axis(entry) -> tuple[int, int]:
    """(axis, copies of the stream on it) of a :func:`residual_axes` entry."""
    return entry if isinstance(entry, tuple) else (entry, 1)


def stream_index(keep: Tensor, dim: int, size: int, copies: int) -> Tensor:
    """Indices along an axis of ``size`` holding ``copies`` of the stream (width ``dim``) and then other entries:
    channels ``keep`` of every copy, and every other entry."""
    kept = [keep + c * dim for c in range(copies)]
    return torch.cat([*kept, torch.arange(copies * dim, size, device=keep.device)])


def channel_importance(model: nn.Module, axes: dict[str, list[int]], batches, loss_fn) -> Tensor:
    """Mean over calibration batches of |Σ W ∂L/∂W| per residual channel (dim,), model in eval mode."""
    params = dict(model.named_parameters())
    scores = torch.zeros(model.config.dim)
    count = 0
    for _ in backward_passes(model, batches, loss_fn):
        total = torch.zeros(model.config.dim)
        for name, dims in axes.items():
            p = params[name]
            if p.grad is None:
                continue
            taylor = (p.detach().float() * p.grad.float()).cpu()
            for entry in dims:
                axis, copies = _axis(entry)
                rows = taylor.movedim(axis, 0)[: copies * model.config.dim]
                total += rows.reshape(copies, model.config.dim, -1).sum(dim=(0, 2))
        scores += total.abs()
        count += 1
    return scores / count


def narrower_model(model: nn.Module, ratio: float) -> nn.Module:
    """A fresh model of :func:`narrower_config` with ``model``'s tokenizer and generation settings; ValueError
    naming ``--prune-dim`` when no model of that width can be built."""
    cfg = narrower_config(model, ratio)
    try:
        return type(model)(cfg, model.tokenizer, model.generation_config)
    except (AssertionError, ValueError) as err:  # e.g. timm's sin-cos table wants a width divisible by 4
        raise ValueError(
            f"--prune-dim {ratio} leaves model.dim={cfg.dim}, which the model cannot have: {err}"
        ) from None


def prune_width(model: nn.Module, narrow: nn.Module, axes: dict[str, list[int]], scores: Tensor) -> nn.Module:
    """Fill ``narrow`` (:func:`narrower_model`) with ``model``'s weights at its most important residual channels by
    ``scores`` (:func:`channel_importance`) along ``axes`` (:func:`residual_axes`); return it in eval mode."""
    keep = best(scores, narrow.config.dim)
    state = {}
    for name, p in model.named_parameters():
        value = p.detach()
        for entry in axes.get(name, []):
            axis, copies = _axis(entry)
            index = stream_index(keep.to(value.device), model.config.dim, value.shape[axis], copies)
            value = value.index_select(axis, index)
        state[name] = value.clone()
    missing, unexpected = narrow.load_state_dict(state, strict=False)
    own = dict(narrow.named_parameters())  # missing names outside it are tied aliases and rebuilt buffers
    if unexpected or any(name in own for name in missing):
        raise ValueError(f"width pruning left weights unset: {missing or unexpected}")
    return narrow.eval()
