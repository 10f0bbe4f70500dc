"""Knowledge distillation (``mlm distill``, ``train.distill``): a student learns a trained teacher's distributions.

Two terms join the student's own objective (the ground truth): the teacher's image↔text similarity distribution,
both directions, over the caption rows of the batch (as open_clip's ``DistillClipLoss``, here as a KL divergence,
which is 0 when the student matches), and its next-token distribution at every caption and answer position,
softened by a temperature T and scaled by T² (Hinton et al., 2015). The teacher runs frozen in eval mode on the
same batch; with another image size it sees the batch resized to its own. The student keeps the teacher's tokenizer
(the token distributions must be over one vocabulary), and the run is resumable like any ``mlm train`` run: the
teacher is named in the config and reloaded on resume.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlm.config import Config, ConfigError
from mlm.data.collate import IGNORE_INDEX

logger = logging.getLogger(__name__)


def teacher_folder(config: Config):
    """The teacher's model folder (``train.distill.teacher`` resolved)."""
    from mlm.run_folder import resolve_checkpoint

    return resolve_checkpoint(config.train.distill.teacher)


def load_tokenizer(config: Config):
    """The teacher's tokenizer, which the student keeps."""
    from mlm.train.init_from import folder_tokenizer

    return folder_tokenizer(teacher_folder(config), f"--teacher {config.train.distill.teacher}")


def load_teacher(config: Config, student_vocab: int, device: torch.device) -> nn.Module:
    """The frozen teacher on ``device``; raises ConfigError when its vocabulary is not the student's."""
    from mlm.model import MLMModel

    folder = teacher_folder(config)
    teacher = MLMModel.from_pretrained(str(folder))
    if teacher.config.vocab_size != student_vocab:
        raise ConfigError(
            f"--teacher {config.train.distill.teacher}: its vocabulary has {teacher.config.vocab_size} tokens, the "
            f"student's {student_vocab}; a student distils with its teacher's tokenizer"
        )
    teacher.requires_grad_(False)
    logger.info("distilling from %s (%s parameters)", folder, f"{sum(p.numel() for p in teacher.parameters()):,}")
    return teacher.eval().to(device)


def teacher_outputs(teacher: nn.Module, batch: dict):
    """The teacher's outputs on the batch, without gradients (images resized to its size if it has another)."""
    images = batch["images"]
    size = teacher.config.image_size
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return teacher(images, batch["text_ids"], batch["text_mask"])


def _kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)) along the last axis."""
    t = teacher_logits.float().log_softmax(dim=-1)
    s = student_logits.float().log_softmax(dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / max(1, s.shape[0])


def similarity_logits(output, rows: Tensor) -> Tensor:
    """Scaled image→text similarities (R, R) of the batch's caption rows."""
    image, text = output.image_embeds[rows], output.text_embeds[rows]
    return output.logit_scale.float() * image.float() @ text.float().T  # the output's scale is exp(log scale)


class DistillLoss(nn.Module):
    """Weighted KL terms: ``contrastive`` (both directions, averaged) and ``tokens`` (T² · KL at temperature T)."""

    def __init__(self, contrastive_weight: float = 1.0, token_weight: float = 1.0, temperature: float = 2.0):
        super().__init__()
        self.contrastive_weight, self.token_weight, self.temperature = contrastive_weight, token_weight, temperature

    @classmethod
    def from_config(cls, config: Config) -> DistillLoss:
        """The loss at ``train.distill``'s weights and temperature."""
        d = config.train.distill
        return cls(d.contrastive_weight, d.token_weight, d.temperature)

    def forward(self, student, teacher, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (weighted total, unweighted parts ``contrastive`` and ``tokens``)."""
        device = student.logits.device
        rows = ~batch["is_vqa"].to(device)
        zero = torch.zeros((), device=device)
        contrastive = zero
        if int(rows.sum()) > 1:
            s, t = similarity_logits(student, rows), similarity_logits(teacher, rows)
            contrastive = (_kl(t, s) + _kl(t.T, s.T)) / 2
        # logits at t predict the label at t + 1: the positions whose next token is a caption or answer token
        targets = batch["labels"].to(device)[:, 1:] != IGNORE_INDEX  # (B, T - 1)
        tokens = zero
        if bool(targets.any()):
            tau = self.temperature
            t, s = teacher.logits[:, :-1][targets], student.logits[:, :-1][targets]  # (N, V)
            tokens = tau**2 * _kl(t / tau, s / tau)
        total = self.contrastive_weight * contrastive + self.token_weight * tokens
        return total, {"contrastive": contrastive.detach(), "tokens": tokens.detach()}


def build(config: Config, device: torch.device) -> tuple[nn.Module | None, DistillLoss]:
    """(the frozen teacher, or None without ``train.distill.teacher``; the distillation loss)."""
    teacher = load_teacher(config, config.model.vocab_size, device) if config.train.distill.teacher else None
    return teacher, DistillLoss.from_config(config)


def add_distillation(teacher, loss_fn: DistillLoss, output, batch: dict, loss: Tensor, parts: dict):
    """The student's loss plus the distillation terms, and its parts with ``distill`` (0 without a teacher)."""
    if teacher is None:
        return loss, {**parts, "distill": torch.zeros((), device=loss.device)}
    extra, _ = loss_fn(output, teacher_outputs(teacher, batch), batch)
    return loss + extra, {**parts, "distill": extra.detach()}
