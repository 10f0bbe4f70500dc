"""Training objectives: contrastive (InfoNCE / SigLIP) over the global batch, and the decoder's cross-entropy.

- :class:`InfoNCELoss` is CLIP's symmetric InfoNCE (Radford et al. 2021) written the way open_clip's
  ``ClipLoss`` is (rank, world size, local-loss variant, embeddings all-gathered with gradients), plus the
  hard-negative reweighting HN-NCE of Radenovic et al. 2023 ("Filtering, Distillation, and Hard Negatives for
  Vision-Language Pre-Training"): negatives weighted by ``w_ij ∝ exp(beta * s_ij)``, mean weight 1, so that
  ``beta = 0`` is exactly InfoNCE.
- :class:`SigLipLoss` is the pairwise sigmoid loss of Zhai et al. 2023 (learnable logit bias).
- :class:`ImageTextLoss` combines them with CoCa's captioning loss (Yu et al. 2022) and a VQA answer loss.

Normalisation across processes: each term is a sum over this process's rows divided by the *global* row (or token)
count, times the world size.  DDP averages gradients over processes, so the averaged gradient -- and the averaged
loss -- equal those of one process that sees the whole global batch, even when processes hold different numbers of
caption and VQA rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlm.config import ConfigError, TrainConfig
from mlm.data.collate import IGNORE_INDEX


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_with_grad(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0; gradients flow back to each process's slice."""
    if world_size == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def gather_counts(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Return ``(world_size, *local.shape)``: every process's copy of a small integer tensor (no gradient)."""
    if world_size == 1:
        return local.unsqueeze(0)
    out = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(out, local.contiguous())
    return torch.stack(out)


def hn_nce_rows(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row HN-NCE loss (Radenovic et al. 2023, alpha = 1); ``beta = 0`` is plain cross-entropy.

    Args:
        logits: (R, N) scaled similarities of R query rows against N candidates.
        labels: (R,) column of each row's positive.
        beta: concentration on hard negatives; weights ``w_ij = (N-1) softmax_{j != i}(beta * s_ij)``.
    """
    if beta == 0.0 or logits.shape[1] < 2:
        return F.cross_entropy(logits, labels, reduction="none")
    rows = torch.arange(logits.shape[0], device=logits.device)
    is_pos = torch.zeros_like(logits, dtype=torch.bool)
    is_pos[rows, labels] = True
    neg_beta = (beta * logits).masked_fill(is_pos, float("-inf"))  # (R, N)
    log_w = math.log(logits.shape[1] - 1) + neg_beta - torch.logsumexp(neg_beta, dim=1, keepdim=True)  # (R, N)
    # The positive keeps weight alpha = 1 (log 0); negatives are shifted by their log-weight.
    weighted = torch.where(is_pos, logits, logits + log_w)  # (R, N)
    return torch.logsumexp(weighted, dim=1) - logits[rows, labels]


class _GlobalBatch(nn.Module):
    """Shared bookkeeping: rank, world size and the selection of valid rows across processes."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def _columns(self, valid: torch.Tensor, *local: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
        """Gather ``local`` features from all processes and keep valid rows; return (features, offset, total)."""
        counts = gather_counts(valid.sum().long().reshape(1), self.world_size).flatten()  # (W,)
        offset = int(counts[: self.rank].sum())
        total = int(counts.sum())
        all_valid = gather_counts(valid.to(torch.uint8), self.world_size).flatten().bool()  # (W * B,)
        gathered = [gather_with_grad(x, self.world_size)[all_valid] for x in local]
        return gathered, offset, total


class InfoNCELoss(_GlobalBatch):
    """Symmetric InfoNCE with hard-negative reweighting over the global batch (open_clip ``ClipLoss`` semantics)."""

    def __init__(
        self, local_loss: bool = False, hard_negative_strength: float = 0.0, rank: int = 0, world_size: int = 1
    ):
        super().__init__(rank, world_size)
        if hard_negative_strength < 0:
            raise ValueError(f"hard_negative_strength={hard_negative_strength} must be >= 0 (0 = plain InfoNCE)")
        self.local_loss = local_loss
        self.hard_negative_strength = hard_negative_strength

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        valid: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        owners: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of (B, E) image/text features; ``valid`` (B,) bool picks the rows that take part (default all).

        ``negatives`` (M, E) are swapped-word captions of the rows ``owners`` (M,); they add
        :meth:`swapped_word_loss`.
        """
        if valid is None:
            valid = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
        (all_img, all_txt), offset, total = self._columns(valid, image_features, text_features)
        # Keeps every feature in the graph, so DDP sees a (zero) gradient even when no row here is valid.
        anchor = 0.0 * (image_features.sum() + text_features.sum())
        if total == 0:
            return anchor
        if self.local_loss:
            img_rows, txt_rows = image_features[valid], text_features[valid]
            labels = torch.arange(img_rows.shape[0], device=valid.device) + offset
            factor = self.world_size
        else:
            img_rows, txt_rows = all_img, all_txt
            labels = torch.arange(total, device=valid.device)
            factor = 1
        logits_per_image = logit_scale * img_rows @ all_txt.T  # (R, N)
        logits_per_text = logit_scale * txt_rows @ all_img.T  # (R, N)
        beta = self.hard_negative_strength
        summed = hn_nce_rows(logits_per_image, labels, beta).sum() + hn_nce_rows(logits_per_text, labels, beta).sum()
        loss = factor * summed / (2 * total) + anchor
        if negatives is not None:
            loss = loss + self.swapped_word_loss(image_features, text_features, logit_scale, valid, negatives, owners)
        return loss

    def swapped_word_loss(self, image, text, logit_scale, valid, negatives, owners) -> torch.Tensor:
        """Mean over caption rows with negatives of -log softmax of the true caption among the row's own
        swapped-word captions (NegCLIP's hard negatives), normalised by the global count of such rows."""
        anchor = 0.0 * negatives.sum()
        has = torch.zeros_like(valid).index_fill_(0, owners, True) & valid if owners.numel() else valid & False
        total = int(gather_counts(has.sum().long().reshape(1), self.world_size).sum())
        if total == 0:
            return anchor
        keep = has[owners]  # (M,) negatives of rows that take part
        owners, negatives = owners[keep], negatives[keep]
        positive = logit_scale * (image * text).sum(-1)  # (B,)
        negative = logit_scale * (image[owners] * negatives).sum(-1)  # (M,)
        # log-sum-exp over {positive_i} and the negatives owned by row i, done per row with scatter ops
        top = positive.detach().clone().scatter_reduce_(0, owners, negative.detach(), reduce="amax")  # (B,)
        exp_sum = torch.exp(positive - top).index_add(0, owners, torch.exp(negative - top[owners]))  # (B,)
        per_row = torch.log(exp_sum) + top - positive  # (B,)
        return self.world_size * per_row[has].sum() / total + anchor


class SigLipLoss(_GlobalBatch):
    """Pairwise sigmoid loss (SigLIP): local images against the texts of every process, gathered with gradients."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of (B, E) image/text features; ``valid`` (B,) bool picks the rows that take part (default all)."""
        if valid is None:
            valid = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
        (all_txt,), offset, total = self._columns(valid, text_features)
        anchor = 0.0 * (image_features.sum() + text_features.sum())
        if total == 0:
            return anchor
        img_rows = image_features[valid]
        logits = logit_scale * img_rows @ all_txt.T + logit_bias  # (R, N)
        signs = -torch.ones_like(logits)
        rows = torch.arange(img_rows.shape[0], device=logits.device)
        signs[rows, rows + offset] = 1.0
        return self.world_size * -F.logsigmoid(signs * logits).sum() / total + anchor


class TokenCrossEntropy(_GlobalBatch):
    """Next-token cross-entropy over rows picked by a mask; labels are HF-style (shifted here, -100 ignored)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean loss over the target tokens of ``rows`` (B,) bool, normalised by the global token count."""
        targets = labels[:, 1:].masked_fill(~rows[:, None], IGNORE_INDEX)  # (B, T-1)
        keep = targets != IGNORE_INDEX
        counts = gather_counts(keep.sum().long().reshape(1), self.world_size)
        total = int(counts.sum())
        anchor = 0.0 * logits[:1, :1].sum()  # keeps the logits in the graph (DDP) when no target is here
        if total == 0:
            return anchor
        # Only the target positions, as (N, V) rows: a (B, V, T) layout runs log-softmax over a strided dim, and
        # the prompt and padding positions (most of a VQA row) need no softmax at all.
        pred = logits[:, :-1][keep].float()  # logits at t predict the label at t+1
        return self.world_size * F.cross_entropy(pred, targets[keep], reduction="sum") / total + anchor


def learned_words(tokenizer, texts) -> torch.Tensor:
    """(V,) bool: the words the word objective learns: tokens of ``texts`` with IDF > 0 (not in every text)."""
    df = _document_frequency(tokenizer, texts)
    learned = (df > 0) & (df < len(texts))  # a token in every text has IDF 0: the objective ignores it
    learned[_special_ids(tokenizer)] = False
    return learned


def _special_ids(tokenizer) -> list[int]:
    """The tokenizer's special token ids (pad, bos, eos, sep, unk) that it has."""
    specials = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id, tokenizer.unk_id]
    return [i for i in specials if i is not None]


def _document_frequency(tokenizer, texts) -> torch.Tensor:
    """(V,) how many of ``texts`` hold each token."""
    df = torch.zeros(tokenizer.vocab_size)
    for text in texts:
        df[sorted(set(tokenizer.tokenize(text)))] += 1
    return df


def word_idf(tokenizer, texts) -> torch.Tensor:
    """(V,) inverse document frequency of each token over ``texts``, ``log((N + 1) / (df + 1))``; special tokens 0."""
    idf = torch.log((len(texts) + 1) / (_document_frequency(tokenizer, texts) + 1))
    idf[_special_ids(tokenizer)] = 0.0
    return idf


class WordLoss(_GlobalBatch):
    """SuperClass's objective (Huang et al., 2024): softmax cross-entropy of the image's word logits against its
    caption's words as an IDF-weighted, normalised multi-hot target, so rare words (a shape) count more than
    frequent ones ("a", "the")."""

    def __init__(self, idf: torch.Tensor, rank: int = 0, world_size: int = 1):
        super().__init__(rank, world_size)
        self.register_buffer("idf", idf.float(), persistent=False)

    def forward(self, word_logits: torch.Tensor, text_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean loss over ``rows`` (B,) bool of (B, V) logits against the words of (B, T) caption ids."""
        idf = self.idf.to(word_logits.device)
        hot = torch.zeros_like(word_logits, dtype=torch.float).scatter_(1, text_ids, 1.0) * idf  # (B, V)
        rows = rows & (hot.sum(1) > 0)
        total = int(gather_counts(rows.sum().long().reshape(1), self.world_size).sum())
        anchor = 0.0 * word_logits.sum()
        if total == 0:
            return anchor
        target = hot[rows] / hot[rows].sum(1, keepdim=True)
        per_row = -(target * word_logits[rows].float().log_softmax(-1)).sum(-1)
        return self.world_size * per_row.sum() / total + anchor


class MatchLoss(_GlobalBatch):
    """Image-text matching (ALBEF / BLIP): cross-entropy of the decoder's match / no-match logits, normalised by the
    global number of pairs."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of (P, 2) logits against (P,) labels (1 = match) over every process's pairs."""
        total = int(gather_counts(torch.tensor([labels.numel()], device=logits.device), self.world_size).sum())
        anchor = 0.0 * logits.sum()
        if total == 0:
            return anchor
        return self.world_size * F.cross_entropy(logits.float(), labels, reduction="sum") / total + anchor


class ImageTextLoss(nn.Module):
    """CoCa-style total: weighted contrastive (caption rows; every row with ``vqa_contrastive``) + caption CE
    (caption rows) + VQA CE (VQA rows)."""

    def __init__(
        self,
        contrastive: nn.Module,
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        vqa_weight: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        words: WordLoss | None = None,
        word_weight: float = 0.0,
        match_weight: float = 0.0,
        exit_weight: float = 0.0,
        vqa_contrastive: bool = False,
    ):
        super().__init__()
        self.contrastive = contrastive
        self.vqa_contrastive = vqa_contrastive  # VQA rows' question-answer text joins the contrastive loss
        self.token_ce = TokenCrossEntropy(rank, world_size)
        self.words = words
        self.weights = {"contrastive": contrastive_weight, "caption": caption_weight, "vqa": vqa_weight,
                        "words": word_weight if words is not None else 0.0, "match": match_weight,
                        "exits": exit_weight, "gates": 1.0, "lens": 1.0}  # fmt: skip
        self.match = MatchLoss(rank, world_size)

    @classmethod
    def from_config(
        cls, train: TrainConfig, rank: int = 0, world_size: int = 1, idf: torch.Tensor | None = None
    ) -> ImageTextLoss:
        """Build the loss named by ``train.contrastive_loss`` with the config's weights (``idf``: the word
        objective's token weights, needed when ``train.word_weight`` > 0)."""
        if train.contrastive_loss == "siglip":
            if train.swap_negatives:
                raise ConfigError(
                    f"train.swap_negatives={train.swap_negatives} only applies to train.contrastive_loss=infonce"
                )
            if train.hard_negative_strength:
                raise ConfigError(
                    f"train.hard_negative_strength={train.hard_negative_strength} only applies to "
                    "train.contrastive_loss=infonce; set it to 0 for siglip"
                )
            contrastive: nn.Module = SigLipLoss(rank, world_size)
        else:
            contrastive = InfoNCELoss(train.local_loss, train.hard_negative_strength, rank, world_size)
        if train.word_weight and idf is None:
            raise ValueError("train.word_weight needs the token IDF of the training captions (see word_idf)")
        words = WordLoss(idf, rank, world_size) if train.word_weight else None
        return cls(contrastive, train.contrastive_weight, train.caption_weight, train.vqa_weight, rank, world_size,
                   words, train.word_weight, train.match_weight, train.exit_weight, train.vqa_contrastive)  # fmt: skip

    def _exits(self, output, caption_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean contrastive loss of the early exits' image embeddings, BCE of the halting gates to each exit's
        agreement with the full depth)."""
        extra = (output.logit_bias, caption_rows) if isinstance(self.contrastive, SigLipLoss) else (caption_rows,)
        exits = [self.contrastive(e, output.text_embeds, output.logit_scale, *extra) for e in output.exit_embeds]
        # what each gate learns: its exit's cosine with the full-depth embedding (unit vectors), clamped to [0, 1]
        agreement = (output.exit_embeds.detach().float() * output.image_embeds.detach().float()[None]).sum(-1)
        gates = F.binary_cross_entropy_with_logits(output.exit_logits.float(), agreement.clamp(0, 1))
        return torch.stack(exits).mean(), gates

    def forward(self, output, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (weighted total, unweighted parts ``contrastive``, ``caption``, ``vqa``, ``words``, ``match``,
        ``exits``, ``gates``) for an MLMOutput."""
        is_vqa = batch["is_vqa"].to(output.logits.device)
        caption_rows = ~is_vqa
        # train.vqa_contrastive: a VQA row's question-answer text stands for its image too
        paired = torch.ones_like(is_vqa) if self.vqa_contrastive else caption_rows
        if isinstance(self.contrastive, SigLipLoss):
            contrastive = self.contrastive(
                output.image_embeds, output.text_embeds, output.logit_scale, output.logit_bias, paired
            )
        else:
            owners = batch.get("negative_owner")
            contrastive = self.contrastive(
                output.image_embeds, output.text_embeds, output.logit_scale, paired,
                getattr(output, "negative_embeds", None),
                None if owners is None else owners.to(output.logits.device),
            )  # fmt: skip
        parts = {
            "contrastive": contrastive,
            "caption": self.token_ce(output.logits, batch["labels"], caption_rows),
            "vqa": self.token_ce(output.logits, batch["labels"], is_vqa),
            "words": torch.zeros((), device=output.logits.device),
            "match": torch.zeros((), device=output.logits.device),
            "exits": torch.zeros((), device=output.logits.device),
            "gates": torch.zeros((), device=output.logits.device),
            "lens": torch.zeros((), device=output.logits.device),
        }
        if getattr(output, "exit_embeds", None) is not None:
            parts["exits"], parts["gates"] = self._exits(output, caption_rows)
        if getattr(output, "exit_lens", None) is not None:  # model.exit_lens: the lenses' own error
            parts["lens"] = output.exit_lens
        if getattr(output, "match_logits", None) is not None:
            parts["match"] = self.match(output.match_logits, output.match_labels)
        if self.words is not None:  # train.word_targets image / answers: every row gets its image's words
            image_words = "word_ids" in batch
            words = batch["word_ids"] if image_words else batch["text_ids"]
            rows = torch.ones_like(caption_rows) if image_words else caption_rows
            parts["words"] = self.words(output.word_logits, words.to(output.logits.device), rows)
        total = sum(self.weights[name] * value for name, value in parts.items() if self.weights[name])
        # Every output stays in the graph, so DDP finds a gradient for every parameter (e.g. the unused SigLIP bias).
        total = total + 0.0 * (output.logit_scale.sum() + output.logit_bias.sum())
        return total, {name: value.detach() for name, value in parts.items()}
