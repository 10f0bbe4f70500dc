"""Image-text retrieval metrics: Recall@K both ways, mean recall, median rank, computed in chunks.

Follows the COCO/Flickr30k Karpathy-split protocol (Karpathy & Fei-Fei, 2015; VSE++, Faghri et al., 2018): an image
has several captions; image->text counts a hit when *any* of its captions is in the top K, text->image when the
caption's own image is. Similarities are dot products of L2-normalised embeddings, computed one chunk of queries
at a time so that 5k images x 25k captions never needs the full (N, M) matrix.

Ties are broken by index (the order a stable sort would give), so ranks do not depend on the chunk size and a
collapsed model whose embeddings are all equal gets chance-level ranks instead of perfect ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

EMBEDDING_KEYS = ("image_embeds", "text_embeds", "text_to_image")


def _check_inputs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor) -> None:
    """Raise ValueError on mismatched shapes, out-of-range image indices or images without captions."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"expected image_embeds (N, E) and text_embeds (M, E), got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if text_to_image.shape != (text_embeds.shape[0],) or text_to_image.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"text_to_image must be an integer tensor of shape (M,) = ({text_embeds.shape[0]},), got "
            f"{text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    n_images = image_embeds.shape[0]
    if n_images == 0 or text_to_image.numel() == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    for name, embeds in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        bad = int((~torch.isfinite(embeds).all(dim=1)).sum())
        if bad:  # NaN compares false with everything, which would rank every target first
            raise ValueError(f"{name}: {bad} of {embeds.shape[0]} rows hold NaN or inf (a diverged model?)")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_images:
        low, high = int(text_to_image.min()), int(text_to_image.max())
        raise ValueError(f"text_to_image values must lie in [0, {n_images - 1}], got {low}..{high}")
    counts = torch.bincount(text_to_image.long().cpu(), minlength=n_images)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption, e.g. image indices {missing}")


def _rank_of(sims: torch.Tensor, target_sim: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
    """0-based rank of the target in each row: higher scores first, equal scores ordered by index."""
    order = torch.arange(sims.shape[1], device=sims.device)  # (C,)
    above = (sims > target_sim[:, None]).sum(dim=1)  # (Q,)
    tied_before = ((sims == target_sim[:, None]) & (order[None, :] < target_idx[:, None])).sum(dim=1)  # (Q,)
    return above + tied_before


def text_to_image_ranks(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """0-based rank of each caption's own image among all images: LongTensor (M,)."""
    _check_inputs(image_embeds, text_embeds, text_to_image)
    images = image_embeds.float()
    targets = text_to_image.to(images.device).long()
    ranks = []
    for start in range(0, text_embeds.shape[0], chunk_size):
        sims = text_embeds[start : start + chunk_size].float().to(images.device) @ images.T  # (Tc, N)
        target = targets[start : start + chunk_size]  # (Tc,)
        target_sim = sims.gather(1, target[:, None]).squeeze(1)  # (Tc,)
        ranks.append(_rank_of(sims, target_sim, target))
    return torch.cat(ranks).cpu()


def image_to_text_ranks(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """0-based rank of the best-ranked caption of each image among all captions: LongTensor (N,)."""
    _check_inputs(image_embeds, text_embeds, text_to_image)
    texts = text_embeds.float()
    owners = text_to_image.to(texts.device).long()  # (M,)
    ranks = []
    for start in range(0, image_embeds.shape[0], chunk_size):
        sims = image_embeds[start : start + chunk_size].float().to(texts.device) @ texts.T  # (Ic, M)
        image_idx = torch.arange(start, start + sims.shape[0], device=texts.device)  # (Ic,)
        positive = owners[None, :] == image_idx[:, None]  # (Ic, M)
        # The best-ranked positive is the one with the highest score, the lowest index among equal scores.
        best_sim = sims.masked_fill(~positive, -math.inf).amax(dim=1)  # (Ic,)
        best_idx = (positive & (sims == best_sim[:, None])).int().argmax(dim=1)  # (Ic,) first True
        ranks.append(_rank_of(sims, best_sim, best_idx))
    return torch.cat(ranks).cpu()


def rank_summary(ranks: torch.Tensor, prefix: str, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (percent), median rank and mean rank (1-based) from 0-based ranks."""
    ranks = ranks.double()
    out = {f"{prefix}_R@{k}": 100.0 * float((ranks < k).double().mean()) for k in ks}
    # torch's median is the lower middle value, which equals VSE++'s floor(np.median(ranks)) for integer ranks.
    out[f"{prefix}_median_rank"] = float(ranks.median()) + 1.0
    out[f"{prefix}_mean_rank"] = float(ranks.mean()) + 1.0
    return out


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 1024,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways, mean recall and median/mean ranks for L2-normalised embeddings.

    Args:
        image_embeds: (N, E) image embeddings, L2-normalised.
        text_embeds: (M, E) caption embeddings, L2-normalised.
        text_to_image: (M,) index of each caption's image; every image needs at least one caption.
        chunk_size: queries scored at once (memory is chunk_size x max(N, M) floats).
        ks: the K of Recall@K.

    Returns:
        ``image_to_text_R@K``, ``text_to_image_R@K`` (percent), ``mean_recall`` (mean of those), ``*_median_rank``,
        ``*_mean_rank`` (1-based), ``num_images``, ``num_texts``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    i2t = rank_summary(image_to_text_ranks(image_embeds, text_embeds, text_to_image, chunk_size), "image_to_text", ks)
    t2i = rank_summary(text_to_image_ranks(image_embeds, text_embeds, text_to_image, chunk_size), "text_to_image", ks)
    recalls = [i2t[f"image_to_text_R@{k}"] for k in ks] + [t2i[f"text_to_image_R@{k}"] for k in ks]
    return {
        **i2t,
        **t2i,
        "mean_recall": sum(recalls) / len(recalls),
        "num_images": image_embeds.shape[0],
        "num_texts": text_embeds.shape[0],
    }


def topk_indices(
    query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, k: int = 5, chunk_size: int = 1024
) -> torch.Tensor:
    """Indices of the ``k`` most similar gallery items for each query, best first: LongTensor (Q, k)."""
    if query_embeds.ndim != 2 or gallery_embeds.ndim != 2 or query_embeds.shape[1] != gallery_embeds.shape[1]:
        shapes = f"{tuple(query_embeds.shape)} and {tuple(gallery_embeds.shape)}"
        raise ValueError(f"expected (Q, E) and (G, E) embeddings, got {shapes}")
    k = min(k, gallery_embeds.shape[0])
    gallery = gallery_embeds.float()
    out = []
    for start in range(0, query_embeds.shape[0], chunk_size):
        sims = query_embeds[start : start + chunk_size].float().to(gallery.device) @ gallery.T  # (Qc, G)
        # A stable descending sort keeps the same index tie-break as the rank functions.
        out.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out).cpu()


def save_embeddings(
    path: str | Path, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor
) -> Path:
    """Write embeddings for ``mlm eval retrieval --predictions FILE`` as safetensors."""
    from safetensors.torch import save_file

    _check_inputs(image_embeds, text_embeds, text_to_image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_to_image": text_to_image.long()}
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path))
    return path


def load_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file with ``image_embeds``, ``text_embeds`` and ``text_to_image``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    missing = [key for key in EMBEDDING_KEYS if key not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing}; has {sorted(tensors)}, needs {list(EMBEDDING_KEYS)}")
    return {key: tensors[key] for key in EMBEDDING_KEYS}
