"""The three graphs ``mlm export onnx`` writes, as PyTorch modules over a model's own layers (no re-implementation).

- :class:`ImageGraph`: images (B, 3, H, W) -> the L2-normalised embedding (B, E) and every decoder layer's image
  latent (the cross-attention caches that :meth:`MultimodalDecoder.encode_contexts` builds once per image);
- :class:`TextGraph`: right-padded ids and their mask (B, T) -> the L2-normalised embedding (B, E);
- :class:`StepGraph`: one cached decoding step (with word grounding, its running state in and out). A graph
  cannot grow a cache, so every self-attention cache has a fixed length L (``total_len``) and the step writes its
  token at ``position``; the RoPE angles are a table over the L positions whose row of ``position`` is gathered,
  and the level masks are computed between ``position`` and the L keys (causal, so keys not yet written are masked
  out). The step therefore computes what :meth:`MLMModel.decode_step` computes (tested equal step by step).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlm.fusion.grounding import GroundingState
from mlm.layers.kv_cache import KVCache, LatentKVCache
from mlm.layers.masks import mask_level, text_pairs


class StaticCache:
    """A fixed-length cache whose ``append`` writes one token at ``position`` and returns all L slots."""

    def __init__(self, first: Tensor, second: Tensor, position: Tensor, seq_dim: int):
        self.tensors, self.position, self.seq_dim = [first, second], position, seq_dim

    def append(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new token's entries (sequence length 1) at ``position``; return the updated (first, second)."""
        for i, new in enumerate((first, second)):
            old = self.tensors[i]
            shape = [1] * old.ndim
            shape[self.seq_dim] = old.shape[self.seq_dim]
            slot = (torch.arange(old.shape[self.seq_dim], device=old.device) == self.position).view(shape)
            self.tensors[i] = torch.where(slot, new.to(old.dtype), old)
        return self.tensors[0], self.tensors[1]


def _cache_type(model) -> type:
    """The cache class of the model's attention (its sequence axis differs: MLA 1, MHA/GQA 2)."""
    return LatentKVCache if model.config.attention == "mla" else KVCache


class ImageGraph(nn.Module):
    """Images -> (embeddings (B, E), context firsts (D, B, N', ...), context seconds (D, B, N', ...))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Embed images and build every decoder layer's cross-attention cache; with word grounding also the
        patches' word log-probs (B, N, V) and the grounding's values (B, N, C)."""
        features = self.model.image_features(images)
        contexts = self.model.decoder.encode_contexts(features.tokens)
        first, second = (torch.stack([c._get()[i] for c in contexts]) for i in (0, 1))
        grounding = self.model.decoder.grounding
        if grounding is None:
            return features.embeds, first, second
        state = grounding.start(features.tokens, self.model.word_maps(features.tokens))
        return features.embeds, first, second, state.word_logprobs, state.values


class _TextTables(nn.Module):
    """RoPE angles over positions 0..L-1 as tables, so a graph gathers or slices rows of them; the level masks are
    computed from positions in the graph (dense tables of L x L would be most of a small INT8 model's graph bytes)."""

    def __init__(self, model, total_len: int, levels: set[str]):
        super().__init__()
        encoder, device, cfg = model.encoder, model.device, model.config
        cos, sin = encoder.text_rope(0, total_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, rope)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.levels = {  # level -> (mask kind, size) of the causal text mask (a routed level's is global)
            level: mask_level(level, True, cfg.local_window, 0, cfg.region_size, 0)[:2] for level in sorted(levels)
        }

    def masks(self, queries: Tensor, keys: Tensor) -> dict[str, Tensor]:
        """Each level's causal (Q, K) mask between query and key positions (the dense path's rows and columns)."""
        return {level: text_pairs(kind, queries, keys, size, True) for level, (kind, size) in self.levels.items()}


class TextGraph(_TextTables):
    """Right-padded ids (B, T <= max_text_len) and mask (B, T) -> L2-normalised text embeddings (B, E); what
    :meth:`MLMModel.text_features` computes, with the masks cut from tables (the graph's T is symbolic)."""

    def __init__(self, model):
        super().__init__(model, model.config.max_text_len, set(model.encoder.level_outputs))
        self.model = model

    def forward(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Embed texts (the mask marks real tokens)."""
        encoder, t = self.model.encoder, text_ids.shape[1]
        x = encoder.modality_embed(encoder.token_embed(text_ids), "text")  # (B, T, C)
        rope = (self.rope_cos[:t], self.rope_sin[:t])
        positions = torch.arange(t, device=x.device)
        masks = self.masks(positions, positions)
        out = encoder.run_blocks(x, "text", rope=rope, masks=masks)
        return self.model.pooler(out.levels, text_mask).embeds


class StepGraph(_TextTables):
    """One decoding step over fixed-length caches: (ids (B, 1), position (), encoder caches (n_blocks, B, ...), decoder
    caches (D, B, ...), image contexts (D, B, ...)) -> (logits (B, V), the four updated caches)."""

    def __init__(self, model, total_len: int):
        # the decoder's self-attention is global
        super().__init__(model, total_len, {block.level for block in model.encoder.blocks} | {"global"})
        self.model, self.total_len = model, total_len

    def empty_caches(self, batch: int) -> dict[str, Tensor]:
        """Zero caches for a batch: the step's cache inputs before the first token."""
        model, cfg = self.model, self.model.config
        like = next(model.parameters())
        if _cache_type(model) is LatentKVCache:
            shapes = [(batch, self.total_len, cfg.mla.kv_lora_rank), (batch, self.total_len, cfg.mla.qk_rope_head_dim)]
        else:
            heads = cfg.mla.n_heads if cfg.attention == "mha" else cfg.mla.n_kv_heads
            qk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
            shapes = [(batch, heads, self.total_len, qk), (batch, heads, self.total_len, cfg.mla.v_head_dim)]
        n = {"encoder": len(model.encoder.blocks), "decoder": len(model.decoder.layers)}
        caches = {f"{part}_{i}": like.new_zeros((n[part], *shapes[i])) for part in n for i in (0, 1)}
        grounding = model.decoder.grounding
        if grounding is not None:  # its running sums over the patches and their normaliser, zero before any token
            caches["ground_sums"] = like.new_zeros(batch, grounding.heads, grounding.patch_pos.shape[1])
            caches["ground_norm"] = like.new_zeros(batch, grounding.heads)
        return caches

    def forward(self, ids, position, encoder_0, encoder_1, decoder_0, decoder_1, context_0, context_1, *grounding):
        """Feed one token per row at ``position``; return its logits and the caches with that token written.
        ``grounding``: with word grounding, the image graph's word log-probs and values and the running sums and
        normaliser (zeros before the first token add nothing, as no state does), which come back updated."""
        model, cache_type = self.model, _cache_type(self.model)
        seq_dim = cache_type.seq_dim
        at = position.reshape(1)
        rope = (self.rope_cos.index_select(0, at), self.rope_sin.index_select(0, at))  # (1, rope) each
        masks = self.masks(at, torch.arange(self.total_len, device=ids.device))  # (1, L)
        enc = [StaticCache(encoder_0[i], encoder_1[i], position, seq_dim) for i in range(encoder_0.shape[0])]
        dec = [StaticCache(decoder_0[i], decoder_1[i], position, seq_dim) for i in range(decoder_0.shape[0])]
        x = model.encoder.modality_embed(model.encoder.token_embed(ids), "text")  # (B, 1, C)
        states = model.encoder.run_blocks(x, "text", rope=rope, masks=masks, caches=enc, absorbed=True, levels=False)
        contexts = [cache_type(context_0[i], context_1[i]) for i in range(context_0.shape[0])]
        state, decoder_caches = None, list(dec)
        if grounding:
            word_logprobs, values, sums, norm = grounding
            state = GroundingState(word_logprobs, values)
            state.sums, state.norm = sums, norm
            decoder_caches.append(state)  # after the per-layer caches, where the decoder looks for it
        logits = model.decoder(
            states.tokens,
            rope=rope,
            mask=masks["global"],
            contexts=contexts,
            caches=decoder_caches,
            absorbed=True,
            ids=ids,
        )  # (B, 1, V)
        updated = [torch.stack([c.tensors[i] for c in caches]) for caches in (enc, dec) for i in (0, 1)]
        if state is not None:
            updated += [state.sums, state.norm]
        return (logits[:, -1], *updated)


class _RenamedDict(nn.ModuleDict):
    """A ModuleDict whose keys are stored with a suffix but looked up by their original names."""

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(f"{key}_")


def exportable(model):
    """A copy of ``model`` that torch.export can print: ModuleDict keys that are Python keywords ("global", a level
    name) break the code it generates, so every ModuleDict is re-keyed (same modules, same lookups)."""
    import copy

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.ModuleDict:
                setattr(module, name, _RenamedDict({f"{key}_": sub for key, sub in child.items()}))
    return model
