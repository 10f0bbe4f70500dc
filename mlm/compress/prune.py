"""Structured pruning: attention heads and feed-forward channels, ranked by their importance on calibration data.

A unit's importance is the first-order estimate of Michel et al. (2019, "Are Sixteen Heads Really Better than
One?"): |∂L/∂ξ| for a gate ξ = 1 on the unit's output, averaged over calibration batches. Scaling a head's (or a
channel's) output by ξ scales its columns of the output projection, so ∂L/∂ξ = Σ W[:, cols] · ∂L/∂W[:, cols] and no
gate has to be inserted. L is the training objective without its auxiliary heads: contrastive + caption + VQA.

Every attention module keeps the same number of heads and every feed-forward the same width (each its own most
important ones), so a pruned model is a normal model of a smaller config (``model.mla.n_heads``,
``model.ffn_hidden_dim``) and loads with the normal loader. MLA's joint latent (``kv_a_proj_with_mqa``,
``kv_lora_rank``) and the decoupled RoPE key are shared by all heads and stay whole: only a head's rows of
``q_proj`` / ``q_b_proj`` and ``kv_b_proj`` and its columns of ``o_proj`` go. With GQA a key/value head goes with
all the query heads it serves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlm.layers.attention import GroupedQueryAttention
from mlm.layers.mla import MultiHeadLatentAttention
from mlm.layers.mlp import SwiGLU

logger = logging.getLogger(__name__)

PRUNABLE = (MultiHeadLatentAttention, GroupedQueryAttention, SwiGLU)


def check_ratio(option: str, value: float) -> float:
    """Return a pruning ratio in [0, 1); raise ValueError naming the option otherwise."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{option} {value}: a pruning ratio is the share removed, in [0, 1)")
    return value


def units(module: nn.Module) -> int:
    """How many prunable units the module has: heads (MLA, MHA), key/value groups (GQA) or hidden channels."""
    if isinstance(module, SwiGLU):
        return module.fc2.in_features
    if isinstance(module, MultiHeadLatentAttention):
        return module.n_heads
    return module.n_kv_heads


def kept(n: int, ratio: float) -> int:
    """Units left of n after removing the share ``ratio`` (rounded; at least one)."""
    return max(1, n - round(ratio * n))


def targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable module of the model by name; raises ValueError for a model with LoRA adapters."""
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model has LoRA adapters: merge them first (mlm.lora.merge_lora) and prune the result")
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def gate_gradient(module: nn.Module) -> Tensor:
    """∂L/∂ξ per unit (n,), from the output projection's weight and gradient after a backward pass."""
    out = module.fc2 if isinstance(module, SwiGLU) else module.o_proj
    w, g = out.weight, out.weight.grad
    if g is None:
        return torch.zeros(units(module), device=w.device)
    return (w.detach().float() * g.float()).view(w.shape[0], units(module), -1).sum(dim=(0, 2))


def backward_passes(model: nn.Module, batches, loss_fn):
    """Run the objective forward and backward on each calibration batch (model in eval mode), yielding after each
    with the gradients in place; clears them at the end and raises ValueError when there was no batch."""
    model.eval()
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(batch["images"], batch["text_ids"], batch["text_mask"])
        loss_fn(out, batch)[0].backward()
        count += 1
        yield
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("the calibration data gave no batch")


def importance(model: nn.Module, batches, loss_fn) -> dict[str, Tensor]:
    """Mean |∂L/∂ξ| per unit of every prunable module over the calibration batches (model in eval mode)."""
    modules = targets(model)
    scores = {name: torch.zeros(units(m)) for name, m in modules.items()}
    count = 0
    for _ in backward_passes(model, batches, loss_fn):
        for name, m in modules.items():
            scores[name] += gate_gradient(m).abs().cpu()
        count += 1
    return {name: s / count for name, s in scores.items()}


def best(scores: Tensor, n_keep: int) -> Tensor:
    """Indices of the n_keep highest scores, in their original order (ties: the earlier unit)."""
    order = torch.argsort(scores, descending=True, stable=True)[:n_keep]
    return order.sort().values


def _spans(index: Tensor, width: int) -> Tensor:
    """Rows (or columns) of the units ``index`` when each unit owns ``width`` consecutive ones."""
    return (index[:, None] * width + torch.arange(width)).flatten()


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
    linear.in_features = len(columns)


def _keep_gains(module: nn.Module, heads: Tensor) -> None:
    if module.query_log_gain is not None:
        module.query_log_gain = nn.Parameter(module.query_log_gain.detach()[heads].clone())


def prune_module(module: nn.Module, keep: Tensor) -> None:
    """Keep only the units ``keep`` (sorted indices) of an attention module or feed-forward, in place."""
    keep = keep.cpu()
    if isinstance(module, SwiGLU):
        _keep_rows(module.fc1_g, keep)
        _keep_rows(module.fc1_x, keep)
        _keep_columns(module.fc2, keep)
        return
    if isinstance(module, MultiHeadLatentAttention):
        q = module.q_b_proj if module.q_lora_rank > 0 else module.q_proj
        _keep_rows(q, _spans(keep, module.qk_head_dim))
        _keep_rows(module.kv_b_proj, _spans(keep, module.qk_nope_head_dim + module.v_head_dim))
        _keep_columns(module.o_proj, _spans(keep, module.v_head_dim))
        _keep_gains(module, keep)
        module.n_heads = len(keep)
        return
    groups = module.n_heads // module.n_kv_heads  # query heads per key/value head
    heads = _spans(keep, groups)
    _keep_rows(module.q_proj, _spans(heads, module.qk_head_dim))
    _keep_rows(module.k_proj, _spans(keep, module.qk_head_dim))
    _keep_rows(module.v_proj, _spans(keep, module.v_head_dim))
    _keep_columns(module.o_proj, _spans(heads, module.v_head_dim))
    if module.pos_key is not None:
        _keep_rows(module.pos_key, _spans(keep, module.qk_rope_head_dim))
    _keep_gains(module, heads)
    module.n_heads, module.n_kv_heads = len(heads), len(keep)


@dataclass
class PruneReport:
    """What pruning did: units per attention module and feed-forward, before and after, and parameters."""

    heads: tuple[int, int]
    ffn: tuple[int, int]
    parameters: tuple[int, int]

    def line(self) -> str:
        """One readable line."""
        return (f"heads {self.heads[0]} -> {self.heads[1]} per attention, feed-forward {self.ffn[0]} -> {self.ffn[1]}"
                f" channels, parameters {self.parameters[0]:,} -> {self.parameters[1]:,}"
                f" ({self.parameters[1] / self.parameters[0]:.3f}x)")  # fmt: skip


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model, a tied weight counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune(model: nn.Module, scores: dict[str, Tensor], heads: float = 0.0, ffn: float = 0.0) -> PruneReport:
    """Remove the share ``heads`` of every attention module's heads and ``ffn`` of every feed-forward's channels,
    the least important by ``scores`` (:func:`importance`); the model's config follows, so it saves and loads."""
    check_ratio("--prune-heads", heads)
    check_ratio("--prune-ffn", ffn)
    modules = targets(model)
    cfg = model.config
    attn = [m for m in modules.values() if not isinstance(m, SwiGLU)]
    mlps = [m for m in modules.values() if isinstance(m, SwiGLU)]
    before = parameter_count(model)
    n_attn, n_ffn = units(attn[0]), units(mlps[0])
    keep_attn, keep_ffn = kept(n_attn, heads), kept(n_ffn, ffn)
    for name, m in modules.items():
        n_keep = keep_ffn if isinstance(m, SwiGLU) else keep_attn
        if n_keep < units(m):
            prune_module(m, best(scores[name], n_keep))
    if cfg.attention == "gqa":
        cfg.mla.n_heads = keep_attn * (cfg.mla.n_heads // cfg.mla.n_kv_heads)
        cfg.mla.n_kv_heads = keep_attn
    else:
        cfg.mla.n_heads = keep_attn
    cfg.ffn_hidden_dim = keep_ffn
    unit = 1 if cfg.attention != "gqa" else cfg.mla.n_heads // cfg.mla.n_kv_heads
    return PruneReport((n_attn * unit, keep_attn * unit), (n_ffn, keep_ffn), (before, parameter_count(model)))
