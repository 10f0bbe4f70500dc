"""Patch embeddings and positions: timm's linear ``PatchEmbed``, optionally after a convolutional stem, and the
absolute position table (``model.image_pos_embed``).

A stem of 3x3 convolutions (stride 2 while the patch size allows, then 1) before the patch projection ("early
convolutions", Xiao et al., 2021) gives each patch token local, non-linear features such as edges and corners: a
linear projection of raw pixels mixes an object's colour and outline multiplicatively, which the shared blocks then
have to untangle. The norm is LayerNorm over channels, so a sample's tokens never depend on the rest of its batch
(unlike BatchNorm).

Overlapping patches (``model.patch_overlap``) are the cheaper form of the same idea: the projection's kernel reaches
past the patch borders, as in PVTv2's and CvT's overlapping patch embeddings.
"""

from __future__ import annotations

import math

import torch
from timm.layers import ConvNormAct, LayerNorm2d, PatchEmbed, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor, nn


def stem_strides(patch_size: int, n_convs: int) -> list[int]:
    """Strides of a stem's convolutions: 2 while the patch size left for the projection is even, then 1 (a 10 px
    patch and two convolutions: strides 2, 1 and a 5 px projection)."""
    strides, left = [], patch_size
    for _ in range(n_convs):
        strides.append(2 if left % 2 == 0 else 1)
        left //= strides[-1]
    return strides


class ConvStemPatchEmbed(nn.Module):
    """``n_convs`` 3x3 conv-norm-GELU layers (strides from :func:`stem_strides`), then a linear patch projection
    to (B, N, dim)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, n_convs: int, width: int = 0):
        super().__init__()
        strides = stem_strides(patch_size, n_convs)
        factor = math.prod(strides)
        if image_size % factor:
            raise ValueError(
                f"model.conv_stem={n_convs} downsamples by {factor}, which must divide model.image_size={image_size}"
            )
        width = width or dim // 2  # the last convolution's channels; each one before has half
        chans = [in_chans] + [max(width >> (n_convs - 1 - i), 8) for i in range(n_convs)]  # e.g. 3 -> 32 -> 64
        self.stem = nn.Sequential(
            *(
                ConvNormAct(chans[i], chans[i + 1], 3, stride=s, norm_layer=LayerNorm2d, act_layer=nn.GELU)
                for i, s in enumerate(strides)
            )
        )
        self.proj = PatchEmbed(
            img_size=image_size // factor, patch_size=patch_size // factor, in_chans=chans[-1], embed_dim=dim
        )
        self.grid_size = self.proj.grid_size

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patch tokens (B, N, dim)."""
        return self.proj(self.stem(images))


def overlap_patches(embed: PatchEmbed, overlap: int) -> PatchEmbed:
    """Widen a timm ``PatchEmbed``'s projection to see ``overlap`` pixels of its neighbours on each side (kernel
    patch + 2 * overlap, same stride, zero padding), so the grid is unchanged and an object cut by a patch border
    is seen whole by the patches it touches."""
    if overlap:
        old = embed.proj
        embed.proj = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size[0] + 2 * overlap,
                               stride=old.stride, padding=overlap)  # fmt: skip
    return embed


def build_patch_embed(
    image_size: int,
    patch_size: int,
    in_chans: int,
    dim: int,
    conv_stem: int = 0,
    overlap: int = 0,
    stem_width: int = 0,
) -> nn.Module:
    """timm's ``PatchEmbed`` when conv_stem is 0, else a :class:`ConvStemPatchEmbed` with that many convolutions;
    ``overlap`` > 0 widens the patch projection (:func:`overlap_patches`, in the stem's pixels); ``stem_width``
    is the last convolution's channels (0: dim / 2)."""
    if conv_stem == 0:
        embed = PatchEmbed(img_size=image_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim)
        return overlap_patches(embed, overlap)
    stem = ConvStemPatchEmbed(image_size, patch_size, in_chans, dim, conv_stem, stem_width)
    overlap_patches(stem.proj, overlap)
    return stem


IMAGE_POS_EMBED = {  # model.image_pos_embed -> the initial table (1, N, C) of a grid, or None
    "sincos": lambda grid, dim: build_sincos2d_pos_embed(list(grid), dim)[None],  # needs dim % 4 == 0
    "learned": lambda grid, dim: trunc_normal_(torch.zeros(1, grid[0] * grid[1], dim), std=0.02),
    "none": lambda grid, dim: None,
}


def image_pos_table(kind: str, grid: tuple[int, int], dim: int) -> Tensor | None:
    """Initial absolute patch positions (1, N, C): 2-D sin-cos, learned (trunc-normal init) or None."""
    return IMAGE_POS_EMBED[kind](grid, dim)
