"""Running a trained :class:`~mlm.model.MLMModel` on images and text: checkpoint loading, image batches, embeddings
in chunks, captions, answers and answer log-likelihoods.

Shared by model-based evaluation (:mod:`mlm.eval.runner`), the ``caption``/``ask``/``search``/``explain`` commands
and the demo. Images come as paths, encoded bytes or PIL images and go through the safe decoder of
:mod:`mlm.data.images` and the evaluation transform (resize + centre crop, CLIP normalisation), so a bad file is
reported by name and reason instead of stopping a batch. The rank mode of VQA scores each candidate answer by its
log-likelihood under the decoder given the image and the prompt ``question: <q> answer:`` (as in the rank
evaluation of generative VQA models, e.g. BLIP's answer ranking, Li et al., 2022).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mlm.data.images import DEFAULT_MAX_PIXELS, decode_image, to_rgb
from mlm.data.records import DataError
from mlm.data.tokenizer import vqa_prompt
from mlm.model import MLMModel
from mlm.run_folder import resolve_checkpoint

logger = logging.getLogger(__name__)

LOGIT_BUDGET = 2**25  # logits (rows x tokens x vocab) scored at once in rank mode, ~128 MB in fp32


def pick_device(device: str | None = None) -> torch.device:
    """The device to run on: the one named (cpu, cuda, cuda:N, mps), else CUDA when available, else CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name; use cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} found)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: use cpu, cuda, cuda:N or mps")
    return chosen


def load_model(path: str | Path, device: str | None = None, exit_threshold: float | None = None) -> MLMModel:
    """Load a model with its tokenizer from a model, checkpoint or run folder (see :func:`resolve_checkpoint`);
    ``exit_threshold`` lets images stop at a confident early exit (models trained with ``model.early_exit``)."""
    from mlm.model_files import read_config

    folder = resolve_checkpoint(path)
    config = read_config(folder / "config.json")  # read here so that a broken file is named
    model = MLMModel.from_pretrained(str(folder), config=config).eval()
    quantized = getattr(model, "quantization", None) is not None
    target = torch.device("cpu") if quantized and not device else pick_device(device)
    if quantized and target.type != "cpu":
        raise ValueError(f"{folder} is an INT8 model, which runs on the CPU; pass --device cpu")
    model = model.to(target)
    if model.tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer.json; captions and questions need the model's tokenizer")
    model.set_exit_threshold(exit_threshold)
    return model


def checkpoint_id(path: str | Path) -> str:
    """A short id that changes whenever the checkpoint's weights file changes (path, size, modification time)."""
    weights = resolve_checkpoint(path) / "model.safetensors"
    stat = weights.stat()
    key = f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def model_fingerprint(model: MLMModel) -> str:
    """A short id of a model's weights (for models that do not come from a checkpoint file)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def image_transform(model: MLMModel):
    """The evaluation transform for this model's image size (resize, centre crop, CLIP normalisation)."""
    from mlm.data.transforms import build_transform

    return build_transform(model.config.image_size, train=False)


def decode_any(image: Any, max_pixels: int = DEFAULT_MAX_PIXELS, origin: str = "") -> Image.Image:
    """An RGB PIL image from a path, bytes, archive slice or PIL image; bad input raises DataError with a reason."""
    if isinstance(image, Image.Image):
        return to_rgb(image, origin)[0]
    return decode_image(image, max_pixels, origin)[0]


def image_batches(
    images: Sequence[Any], transform, batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, errors: dict | None = None
) -> Iterator[tuple[list[int], Tensor]]:
    """Yield (indices, pixels (b, 3, H, W)) for images decoded in batches; bad ones go to ``errors`` {index: msg}."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        kept, pixels = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                pixels.append(transform(decode_any(images[i], max_pixels)))
                kept.append(i)
            except DataError as err:
                if errors is None:
                    logger.warning("skipped an image: %s", err)
                else:
                    errors[i] = str(err)  # the caller reports it, once
        if kept:
            yield kept, torch.stack(pixels)


def check_question(model: MLMModel, question: str, what: str = "question") -> None:
    """Raise ValueError naming the question when its prompt leaves no room for an answer in the model's text
    length (``model.max_text_len`` tokens: BOS, the prompt, at least one answer token, EOS)."""
    limit = model.config.max_text_len
    tokens = 1 + len(model.tokenizer.tokenize(vqa_prompt(question.strip(), model.config.vqa_prompt))) + 2
    if tokens > limit:
        raise ValueError(
            f"{what}: {tokens} tokens with the prompt and an answer; this model reads at most {limit} "
            "(model.max_text_len): shorten the question"
        )


@torch.no_grad()
def embed_texts(model: MLMModel, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """L2-normalised text embeddings (M, E) on the CPU, computed batch_size texts at a time."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = model.tokenizer.encode_batch(list(texts[start : start + batch_size]), model.config.max_text_len)
        out.append(
            model.encode_text(ids.to(model.device), normalize=True, text_mask=mask.to(model.device)).float().cpu()
        )
    if not out:
        return torch.zeros(0, model.config.embed_dim)
    return torch.cat(out)


@torch.no_grad()
def embed_images(model: MLMModel, pixels: Tensor) -> Tensor:
    """L2-normalised image embeddings (B, E) on the CPU for normalised pixels (B, 3, H, W)."""
    return model.encode_image(pixels.to(model.device), normalize=True).float().cpu()


def _answer_sequences(model: MLMModel, questions: Sequence[str], candidates: Sequence[str]):
    """Ids of every (question, candidate) pair, ``[BOS] prompt answer [EOS]`` padded (B*K, T), and a (B*K, T-1) mask
    that is True where the logits at t predict an answer token or the EOS at t + 1."""
    tok = model.tokenizer
    answers = [tok.tokenize(c) + [tok.eos_id] for c in candidates]
    sequences, spans = [], []
    for question in questions:
        # the prompt's tail keeps the "answer:" marker when a long question is cut, as training does
        text = vqa_prompt(question.strip(), model.config.vqa_prompt)
        prompt = [tok.bos_id] + tok.tokenize(text)[-(model.config.max_text_len - 2) :]
        for answer in answers:
            sequences.append(prompt + answer)
            spans.append((len(prompt) - 1, len(prompt) - 1 + len(answer)))
    ids, _ = tok.pad(sequences)  # (B*K, T), right-padded: the causal logits of real tokens never see the pads
    targets = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)  # (B*K, T-1)
    for row, (begin, end) in enumerate(spans):
        targets[row, begin:end] = True
    return ids, targets


@torch.no_grad()
def answer_log_likelihood(model: MLMModel, pixels: Tensor, questions: Sequence[str], candidates: Sequence[str]):
    """Log-likelihood (B, C) of each candidate answer (its tokens and EOS) given each image and question."""
    if len(questions) != pixels.shape[0]:
        raise ValueError(f"got {len(questions)} questions for {pixels.shape[0]} images")
    image_tokens = model.image_features(pixels.to(model.device)).tokens  # (B, N, C); early exit applies
    ids, targets = _answer_sequences(model, questions, candidates)
    ids, targets = ids.to(model.device), targets.to(model.device)
    rows_per_call = max(1, LOGIT_BUDGET // (ids.shape[1] * model.config.vocab_size))
    scores = []
    for r0 in range(0, ids.shape[0], rows_per_call):
        chunk = ids[r0 : r0 + rows_per_call]  # (n, T)
        owners = torch.arange(r0, r0 + chunk.shape[0], device=model.device) // len(candidates)  # (n,) image rows
        logprobs = model.text_logits(image_tokens[owners], chunk).float().log_softmax(dim=-1)  # (n, T, V)
        token_lp = logprobs[:, :-1].gather(2, chunk[:, 1:, None]).squeeze(2)  # (n, T-1): log p(token t+1)
        scores.append(token_lp.masked_fill(~targets[r0 : r0 + rows_per_call], 0.0).sum(dim=1).cpu())
    return torch.cat(scores).view(len(questions), len(candidates))
