"""The shared-weight encoder: one stack of attention blocks reads image patches and text tokens.

Images enter through timm's ``PatchEmbed`` (optionally after a convolutional stem) and text through a token
embedding; a learned modality embedding is added to both. Attention sees positions through RoPE: 2-D axial for
patches, 1-D for text. Patches also get an absolute position table (2-D sin-cos by default, as in MAE; or learned):
RoPE only tells a query where a key lies relative to it, so without the table pooled image vectors and the
decoder's cross-attention (no RoPE across modalities) cannot tell "top left" from "bottom right". Every block
attends at its configured level (local window → regional → global); images use the full level mask and text the
causal one, so a single text pass serves both the contrastive embedding and the caption decoder (CoCa, Yu et al.,
2022). The normalised output of the last block of each level is kept for hierarchical pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mlm.config import ModelConfig
from mlm.encoders.block import EncoderBlock
from mlm.encoders.patches import build_patch_embed, image_pos_table
from mlm.encoders.pooling import last_block_of_level
from mlm.encoders.sharing import ModalityEmbedding, PerModality, separate_modules
from mlm.layers.level_attention import LevelPattern
from mlm.layers.rope import rope_1d, rope_2d


@dataclass
class EncoderOutput:
    """Hidden states of one modality after the shared encoder."""

    tokens: Tensor  # (B, T, C) normalised output of the last block
    levels: dict[str, Tensor]  # level -> (B, T, C) normalised output of that level's last block


class SharedEncoder(nn.Module):
    """Patch and token embeddings, a modality embedding and the shared blocks with their level masks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = build_patch_embed(
            cfg.image_size, cfg.patch_size, cfg.in_chans, cfg.dim, cfg.conv_stem, cfg.patch_overlap, cfg.conv_stem_width
        )
        table = image_pos_table(cfg.image_pos_embed, tuple(self.patch_embed.grid_size), cfg.dim)
        if cfg.image_pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:  # fixed: rebuilt from the config, so not stored in checkpoints
            self.register_buffer("pos_embed", table, persistent=False)
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.modality_embed = ModalityEmbedding(cfg.dim)
        self.blocks = nn.ModuleList([EncoderBlock(cfg, level) for level in cfg.levels])
        self.norm = PerModality(lambda: nn.RMSNorm(cfg.dim, eps=cfg.norm_eps), separate_modules(cfg.sharing)[0])
        self.level_outputs = last_block_of_level(cfg.levels)  # level -> index of the block it pools
        self.grad_checkpointing = False

    def new_caches(self) -> list:
        """Return one empty self-attention cache per block, for incremental text decoding."""
        return [block.attn.new_cache() for block in self.blocks]

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of a configured image."""
        return tuple(self.patch_embed.grid_size)

    def text_rope(self, start: int, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Return 1-D RoPE (cos, sin), each (end - start, rope_dim), for text positions start..end-1."""
        positions = torch.arange(start, end, device=device)
        return rope_1d(positions, self.cfg.mla.qk_rope_head_dim, self.cfg.mla.rope_theta)

    def _pattern(self, level: str, n_tokens: int, causal: bool, grid, start: int = 0, total: int = 0) -> LevelPattern:
        cfg = self.cfg
        if level == "routed" and causal:  # a selection over the whole text would let later tokens choose
            level = "global"
        return LevelPattern(
            level, n_tokens, causal, grid, cfg.local_window, cfg.local_window_2d, cfg.region_size, cfg.region_size_2d,
            start=start, impl=cfg.level_impl, total=total,
        )  # fmt: skip

    def text_mask(self, level: str, total_len: int, start: int, end: int, device: torch.device) -> LevelPattern:
        """The causal pattern of positions start..end-1 over keys 0..end-1; its dense rows are cut from the cached
        total_len mask (cheap every decoding step), and long whole sequences run without building it."""
        return self._pattern(level, end - start, True, None, start=start, total=total_len)

    def image_mask(self, level: str, device: torch.device) -> LevelPattern:
        """Return the full (non-causal) pattern of one level over the patch grid (``.mask()`` builds it densely)."""
        gh, gw = self.grid
        return self._pattern(level, gh * gw, False, (gh, gw))

    def run_blocks(
        self, x: Tensor, modality: str, *, rope, masks: dict[str, Tensor], caches=None, absorbed=False, levels=True
    ) -> EncoderOutput:
        """Run every block on embedded tokens x (B, T, C); masks maps level -> (T, S) mask."""
        pooled_blocks = set(self.level_outputs.values()) if levels else set()
        normed: dict[int, Tensor] = {}
        for i, out in self.block_outputs(x, modality, rope=rope, masks=masks, caches=caches, absorbed=absorbed):
            if i in pooled_blocks:
                normed[i] = self.norm(out, modality)
        last = len(self.blocks) - 1
        tokens = normed[last] if last in normed else self.norm(out, modality)
        outputs = {level: normed[idx] for level, idx in self.level_outputs.items()} if levels else {}
        return EncoderOutput(tokens=tokens, levels=outputs)

    def block_outputs(self, x: Tensor, modality: str, *, rope, masks: dict, caches=None, absorbed=False):
        """Yield (block index, its output (B, T, C)) for every block, recomputed in the backward pass when gradient
        checkpointing is on (training, no cache)."""
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, modality, rope=rope, mask=masks[block.level], use_reentrant=False)
            else:
                x = block(x, modality, rope=rope, mask=masks[block.level], cache=cache, absorbed=absorbed)
            yield i, x

    def encode_image(self, images: Tensor) -> EncoderOutput:
        """Encode images (B, in_chans, H, W) into patch states (B, N, C), full level-masked attention."""
        x, rope, masks = self.embed_image(images)
        return self.run_blocks(x, "image", rope=rope, masks=masks)

    def embed_image(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], dict]:
        """The embedded patches (B, N, C), their 2-D RoPE and the level patterns the blocks attend with."""
        cfg = self.cfg
        if images.ndim != 4 or tuple(images.shape[1:]) != (cfg.in_chans, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images have shape {tuple(images.shape)}; the model expects (B, {cfg.in_chans}, "
                f"{cfg.image_size}, {cfg.image_size}) (model.in_chans, model.image_size)"
            )
        x = self.modality_embed(self.patch_embed(images), "image")  # (B, N, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        rope = rope_2d(*self.grid, cfg.mla.qk_rope_head_dim, cfg.mla.rope_theta, device=x.device)
        masks = {level: self.image_mask(level, x.device) for level in self.level_outputs}
        return x, rope, masks

    def encode_text(
        self, text_ids: Tensor, *, start: int = 0, total_len: int | None = None, caches=None, absorbed: bool = False
    ) -> EncoderOutput:
        """Encode token ids (B, T) at positions start..start+T-1 with causal level masks.

        With ``caches`` (one per block) the new keys are appended and earlier ones reused (incremental decoding);
        ``total_len`` is the longest sequence the caches will hold, so every step slices the same cached mask.
        """
        if text_ids.ndim != 2:
            raise ValueError(f"text_ids must be (B, T), got shape {tuple(text_ids.shape)}")
        if int(text_ids.max()) >= self.cfg.vocab_size or int(text_ids.min()) < 0:
            raise ValueError(
                f"text_ids hold values in [{int(text_ids.min())}, {int(text_ids.max())}] but "
                f"model.vocab_size={self.cfg.vocab_size}"
            )
        end = start + text_ids.shape[1]
        total_len = max(total_len or end, end)
        x = self.modality_embed(self.token_embed(text_ids), "text")  # (B, T, C)
        rope = self.text_rope(start, end, x.device)
        masks = {level: self.text_mask(level, total_len, start, end, x.device) for level in self.level_outputs}
        return self.run_blocks(
            x, "text", rope=rope, masks=masks, caches=caches, absorbed=absorbed, levels=caches is None
        )
