"""Blocked softmax attention that recomputes its scores in the backward pass instead of storing them.

The local levels (:mod:`mlm.layers.level_attention`) cut q, k, v into blocks (query blocks against the band or
tile of keys around them). Autograd through those products would keep every block's probabilities, n·L numbers;
:func:`blocked_attention` keeps q, k, v, the output and one log-sum-exp per query, and rebuilds the scores block by
block in backward, as FlashAttention (Dao et al., 2022) does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _block_scores(qb: Tensor, kb: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Scaled scores (..., c, L) of query blocks against their key blocks, -inf where not allowed."""
    return ((qb @ kb.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))


def _attend(qb: Tensor, kb: Tensor, vb: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The output (..., c, Dv) and each query's log-sum-exp (..., c, 1); every row allows a key (padded rows all)."""
    s = _block_scores(qb, kb, allowed, scale)
    lse = s.logsumexp(dim=-1, keepdim=True)
    return (s - lse).exp() @ vb, lse


class _RecomputedBlocks(torch.autograd.Function):
    """Blocked attention that keeps q, k, v, the output and the log-sum-exps for backward and rebuilds each block's
    scores there (FlashAttention's recomputation): the n·L probabilities are never stored. The blocks are cut from
    q, k, v again under autograd, so their backward (pad, unfold: overlapping bands summed) stays torch's."""

    @staticmethod
    def forward(ctx, blocks, allowed: Tensor, scale: float, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, lse = _attend(*blocks(q, k, v), allowed, scale)
        ctx.blocks, ctx.allowed, ctx.scale = blocks, allowed, scale
        kind = q.device.type  # the recomputation runs under the forward's autocast, so dtypes match
        ctx.amp = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            qb, kb, vb = ctx.blocks(*leaves)
        kind, dtype, amp = ctx.amp
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=amp):
            p = (_block_scores(qb, kb, ctx.allowed, ctx.scale) - lse).exp()
            grad_vb = p.transpose(-1, -2) @ grad_out
            grad_s = p * (grad_out @ vb.transpose(-1, -2) - (grad_out * out).sum(dim=-1, keepdim=True)) * ctx.scale
            grads = (grad_s @ kb, grad_s.transpose(-1, -2) @ qb, grad_vb)
            grads = [g.to(x.dtype) for g, x in zip(grads, (qb, kb, vb), strict=True)]
        return None, None, None, *torch.autograd.grad((qb, kb, vb), leaves, grads)


def blocked_attention(blocks, allowed: Tensor, scale: float, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of each query block over its key block under ``allowed``; ``blocks(q, k, v)`` cuts the
    blocks. Training keeps only the inputs, output and log-sum-exps (:class:`_RecomputedBlocks`)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _RecomputedBlocks.apply(blocks, allowed, scale, q, k, v)
    return _attend(*blocks(q, k, v), allowed, scale)[0]
