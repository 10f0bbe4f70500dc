"""Attention maps of one image and caption: hierarchical pooling weights per level and per-word cross-attention.

Two views of where the model looks. The pooling weights are the softmax over patches that each level (local,
regional, global) uses to pool the image into its embedding (:mod:`mlm.encoders.pooling`). The cross-modal
attention of a word is the decoder's attention over image patches at the step that produces the word (as "Show,
Attend and Tell", Xu et al., 2015, draws it): the query at position t-1 reads the image to predict token t,
averaged over heads and decoder layers and over the word's sub-word tokens. The weights come from
:meth:`mlm.layers.mla.MultiHeadLatentAttention.attention_weights`, read through forward pre-hooks on the
cross-attention modules during one teacher-forced pass, so the model's own code path is untouched.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor

from mlm.layers.mla import MultiHeadLatentAttention
from mlm.model import MLMModel


@dataclass
class AttentionMaps:
    """Everything :func:`plot_attention_maps` draws, on the patch grid."""

    caption: str
    pool: dict[str, Tensor]  # level -> (gh, gw) pooling weights over patches (sum to 1)
    level_weights: dict[str, float]  # level -> learned mixing weight of that level's pooled vector
    words: list[str]
    word_maps: Tensor  # (W, gh, gw) cross-attention over patches per word (the null token left out)


@torch.no_grad()
def cross_attention(model: MLMModel, image_tokens: Tensor, ids: Tensor) -> Tensor:
    """Cross-attention weights (L, B, H, T, N) of every decoder layer for token ids (B, T) over image tokens."""
    layers = model.decoder.layers
    if not all(isinstance(layer.cross_attn, MultiHeadLatentAttention) for layer in layers):
        raise ValueError(f"attention maps need model.attention=mla, this model has {model.config.attention!r}")
    captured: list[tuple[Tensor, Tensor]] = []

    def keep_inputs(module, args, kwargs):
        # normed text states (B, T, C), image tokens (B, N, C) and their position features (positional keys)
        captured.append((args[0], kwargs["context"], kwargs.get("context_pos")))

    handles = [layer.cross_attn.register_forward_pre_hook(keep_inputs, with_kwargs=True) for layer in layers]
    try:
        model.text_logits(image_tokens, ids)
    finally:
        for handle in handles:
            handle.remove()
    pairs = zip(layers, captured, strict=True)
    return torch.stack(
        [layer.cross_attn.attention_weights(x, context=ctx, context_pos=pos) for layer, (x, ctx, pos) in pairs]
    )


def _words(model: MLMModel, caption: str) -> tuple[list[int], list[str], list[int]]:
    """Caption token ids (no specials), the caption's words and the word index of each token."""
    encoding = model.tokenizer.tokenizer.encode(caption, add_special_tokens=False)
    limit = model.config.max_text_len - 1  # BOS + tokens, the longest text the model was trained on
    ids, word_ids, offsets = encoding.ids[:limit], encoding.word_ids[:limit], encoding.offsets[:limit]
    keys = [word if word is not None else f"token {k}" for k, word in enumerate(word_ids)]  # sub-words share one
    order = list(dict.fromkeys(keys))
    spans: dict = {}
    for key, (start, end) in zip(keys, offsets, strict=True):
        first, last = spans.get(key, (start, end))
        spans[key] = (min(first, start), max(last, end))
    words = [caption[spans[key][0] : spans[key][1]] for key in order]
    return ids, words, [order.index(key) for key in keys]


@torch.no_grad()
def attention_maps(model: MLMModel, pixels: Tensor, caption: str) -> AttentionMaps:
    """Pooling weights and per-word cross-attention for one image (1, 3, H, W) and its caption."""
    if pixels.shape[0] != 1:
        raise ValueError(f"attention maps take one image, got a batch of {pixels.shape[0]}")
    if model.tokenizer is None:
        raise ValueError("attention maps need the model's tokenizer")
    ids, words, token_word = _words(model, caption)
    if not ids:
        raise ValueError(f"the caption {caption!r} has no tokens")
    pixels = pixels.to(model.device)
    features = model.image_features(pixels)
    grid = model.encoder.grid
    pool = {level: w[0].float().cpu().view(*grid) for level, w in features.pool_weights.items()}
    level_weights = dict(zip(model.pooler.levels, model.pooler.level_weights.tolist(), strict=True))
    text = torch.tensor([[model.tokenizer.bos_id, *ids]], device=model.device)  # (1, T)
    weights = cross_attention(model, features.tokens, text)[:, 0].mean(dim=(0, 1)).float().cpu()  # (T, [1 +] N)
    weights = weights[:, -grid[0] * grid[1] :]  # the patches (a null token's share, model.cross_null, left out)
    # the query at position t reads the image to produce token t + 1: row k produces caption token k
    rows = torch.tensor(token_word)
    word_maps = torch.stack([weights[: len(ids)][rows == w].mean(dim=0) for w in range(len(words))])  # (W, N)
    return AttentionMaps(caption, pool, level_weights, words, word_maps.view(len(words), *grid))


def _overlay(ax, image: Image.Image, heat: Tensor, title: str) -> None:
    """The image with a heat map stretched over it."""
    ax.imshow(image)
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, extent=(0, image.width, image.height, 0), interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention_maps(
    image: Image.Image, maps: AttentionMaps, path: str | Path, max_words: int = 16, size: int = 192
) -> Path:
    """Write a PNG: the image and each level's pooling weights, then each caption word's cross-attention."""
    from mlm.eval.plots import pyplot, save_figure

    plt = pyplot()
    shown = ImageOps.fit(image.convert("RGB"), (size, size))  # the eval transform's centre crop
    words = list(zip(maps.words, maps.word_maps, strict=True))[:max_words]
    cols = max(4, len(maps.pool) + 1)
    rows = 1 + (len(words) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(shown)
    axes[0, 0].set_title("image", fontsize=9)
    for col, (level, heat) in enumerate(maps.pool.items(), start=1):
        axes[0, col].axis("on")
        _overlay(axes[0, col], shown, heat, f"pooling: {level} (w={maps.level_weights[level]:.2f})")
    for k, (word, heat) in enumerate(words):
        ax = axes[1 + k // cols, k % cols]
        ax.axis("on")
        _overlay(ax, shown, heat, f"'{word}'")
    fig.suptitle(textwrap.shorten(f"cross-attention per word: {maps.caption}", 110), fontsize=10)
    return save_figure(fig, plt, path)
