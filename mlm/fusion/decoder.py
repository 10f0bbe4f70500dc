"""The multimodal decoder: a stack of cross-modal layers over the encoder's causal text states, and the LM head.

As in CoCa (Yu et al., 2022) the unimodal text pass of the shared encoder is reused: its final text states go
through layers that add cross-modal attention over the image tokens, then a final norm and an LM head whose weight
is the text token embedding (tied, as in GPT-2 / nanoGPT). Logits at position t predict token t + 1. With
``model.cross_pos_keys`` the decoder holds the patch grid's 2-D sin-cos table, the position features of the
cross-attention's positional keys. With ``model.cross_null`` every cross-attention also sees one learned token
before the image's: a place for a query's attention to go when the image holds nothing it asks for (an attention
sink, as ViT registers, Darcet et al., 2024, give a transformer's attention), so "is there a red star?" can read
"nothing matched" instead of an average of whatever is there. With ``model.cross_pos_values`` the image tokens the
decoder reads also carry a learned projection of their patch position, so what a query reads from an object says
where it is (positional keys only say where to look). With ``model.cross_query_gain`` each cross-attention head's
queries carry a learned gain that starts at that value: a per-head temperature on the search. With
``model.decoder_short_conv`` the text states first pass a short causal convolution (:mod:`mlm.fusion.short_conv`);
with ``model.decoder_grounding`` each position then reads where the word head sees its recent words
(:mod:`mlm.fusion.grounding`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mlm.config import ModelConfig
from mlm.encoders.patches import image_pos_table
from mlm.fusion.cross_modal import CrossModalBlock
from mlm.fusion.grounding import GroundingState, WordGrounding
from mlm.fusion.short_conv import ConvHistory, ShortConv


class MultimodalDecoder(nn.Module):
    """Cross-modal layers, a final RMSNorm and an LM head tied to the token embedding."""

    def __init__(self, cfg: ModelConfig, token_embed: nn.Embedding):
        super().__init__()
        self.layers = nn.ModuleList([CrossModalBlock(cfg) for _ in range(cfg.decoder_layers)])
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = token_embed.weight  # tied: one tensor, (V, C)
        self.grad_checkpointing = False
        k = cfg.decoder_short_conv
        self.short_conv = ShortConv(cfg.dim, k) if k > 1 else None
        grid = (cfg.image_size // cfg.patch_size,) * 2
        heads = cfg.decoder_grounding
        needs_pos = cfg.cross_pos_keys or cfg.cross_pos_values or heads
        patches = image_pos_table("sincos", grid, cfg.dim) if needs_pos else None
        self.grounding = WordGrounding(cfg.dim, cfg.vocab_size, heads, patches) if heads else None
        self.pos_values = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.cross_pos_values else None
        if self.pos_values is not None:
            nn.init.zeros_(self.pos_values.weight)  # starts as the plain image tokens
        self.register_buffer("patch_pos", patches if cfg.cross_pos_values else None, persistent=False)
        table = patches if cfg.cross_pos_keys else None  # (1, N, C)
        self.null_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02) if cfg.cross_null else None
        if table is not None and self.null_token is not None:
            table = torch.cat([table.new_zeros(1, 1, cfg.dim), table], dim=1)  # the null token has no place
        self.register_buffer("context_pos", table, persistent=False)  # rebuilt from the config, not saved

    def new_caches(self, image_tokens: Tensor | None = None, word_logprobs: Tensor | None = None) -> list:
        """Return one empty self-attention cache per layer, then the short convolution's history and the word
        grounding's state (which needs the image tokens (B, N, C) and their word log-probs (B, N, V)), if any."""
        caches = [layer.self_attn.new_cache() for layer in self.layers]
        if self.short_conv is not None:
            caches.append(ConvHistory())
        if self.grounding is not None:
            if image_tokens is None or word_logprobs is None:
                raise ValueError("model.decoder_grounding: decoding caches need the image tokens and word log-probs")
            caches.append(self.grounding.start(image_tokens, word_logprobs))
        return caches

    def _extra(self, caches: list | None, kind: type):
        """The cache of ``kind`` after the per-layer caches, or None."""
        extra = [] if caches is None else caches[len(self.layers) :]
        return next((c for c in extra if isinstance(c, kind)), None)

    def image_context(self, image_tokens: Tensor) -> Tensor:
        """Image tokens (B, N, C) as the cross-attention reads them: plus their projected positions with
        ``model.cross_pos_values``, after the null token (B, 1 + N, C) with ``model.cross_null``."""
        if self.pos_values is not None:
            image_tokens = image_tokens + self.pos_values(self.patch_pos.to(image_tokens.dtype))
        if self.null_token is None:
            return image_tokens
        null = self.null_token.to(image_tokens.dtype).expand(image_tokens.shape[0], -1, -1)
        return torch.cat([null, image_tokens], dim=1)

    def encode_contexts(self, image_tokens: Tensor) -> list:
        """Return every layer's cross-attention cache for image tokens (B, N, C)."""
        context = self.image_context(image_tokens)
        return [layer.encode_context(context, self.context_pos) for layer in self.layers]

    def forward(
        self,
        text_states: Tensor,
        *,
        context: Tensor | None = None,
        contexts: list | None = None,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        caches: list | None = None,
        absorbed: bool = False,
        hidden: bool = False,
        ids: Tensor | None = None,
        word_logprobs: Tensor | None = None,
    ) -> Tensor:
        """Return LM logits (B, T, V) for text states (B, T, C), or with ``hidden`` the normed states (B, T, C).

        Give either ``context`` (image tokens (B, N, C), training) or ``contexts`` (per-layer caches from
        :meth:`encode_contexts`, decoding); ``caches`` are the per-layer self-attention caches. With
        ``model.decoder_grounding``, ``ids`` (B, T) are the tokens of the text states and, without caches,
        ``word_logprobs`` (B, N, V) the image patches' word log-probs.
        """
        if (context is None) == (contexts is None):
            raise ValueError("give exactly one of context (image tokens) or contexts (encoded per layer)")
        x = text_states
        if self.short_conv is not None:
            x = self.short_conv(x, self._extra(caches, ConvHistory))
        if self.grounding is not None:
            if ids is None or (caches is None and (word_logprobs is None or context is None)):
                raise ValueError("model.decoder_grounding: the decoder needs the token ids and the image's word maps")
            state = self._extra(caches, GroundingState)
            if state is None:
                state = self.grounding.start(context, word_logprobs)
            x = self.grounding(x, ids, state, cached=caches is not None)
        context = None if context is None else self.image_context(context)
        for i, layer in enumerate(self.layers):
            ctx = context if contexts is None else contexts[i]
            cache = caches[i] if caches is not None else None
            pos = self.context_pos if contexts is None else None
            if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, context=ctx, rope=rope, mask=mask, context_pos=pos, use_reentrant=False)
            else:
                x = layer(x, context=ctx, rope=rope, mask=mask, cache=cache, absorbed=absorbed, context_pos=pos)
        x = self.norm(x)
        return x if hidden else self.lm_head(x)
