"""SwiGLU feed-forward block (Shazeer, "GLU Variants Improve Transformer", 2020), as in LLaMA and DeepSeek.

``out = W_2 (SiLU(W_g x) * W_x x)``, with no biases; a thin wrapper over ``timm.layers.SwiGLU``.
"""

from __future__ import annotations

from timm.layers import SwiGLU as _TimmSwiGLU


class SwiGLU(_TimmSwiGLU):
    """SwiGLU MLP from dim to hidden_dim and back, without biases, dropout after the gate and the output."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__(in_features=dim, hidden_features=hidden_dim, bias=False, drop=dropout)
