"""Caption metrics of the COCO caption evaluation: BLEU-1..4, METEOR, ROUGE-L, CIDEr, via pycocoevalcap.

Follows "Microsoft COCO Captions: Data Collection and Evaluation Server" (Chen et al., 2015): captions are
tokenised with the Stanford PTB tokenizer (punctuation tokens dropped), then scored with BLEU (Papineni et al.,
2002), METEOR 1.5 (Denkowski & Lavie, 2014), ROUGE-L (Lin, 2004) and CIDEr-D (Vedantam et al., 2015) as
implemented by pycocoevalcap. Scores are scaled by 100, as papers report them.

The PTB tokenizer and METEOR run on Java. Without ``java`` on PATH we log a warning, tokenise with
:func:`simple_tokenize` instead (lower-case, drop apostrophes, every other character that is not a letter, digit
or underscore becomes a space, split on whitespace) and report METEOR as missing (``None``), never as 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlm.eval.results_io import is_id, read_json, read_results

logger = logging.getLogger(__name__)

METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
TOKENIZERS = ("auto", "ptb", "simple")
_APOSTROPHES = re.compile(r"['\u2019]")
_NON_WORD = re.compile(r"[^\w\s]")


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Java-free tokenisation: lower-case, drop apostrophes, punctuation to spaces, single-space the words."""
    text = _APOSTROPHES.sub("", text.lower())
    return " ".join(_NON_WORD.sub(" ", text).split())


def tokenize_captions(captions: Mapping[Any, Sequence[str]], tokenizer: str = "ptb") -> dict[Any, list[str]]:
    """Tokenise every caption of ``{key: [caption, ...]}`` with the PTB tokenizer or :func:`simple_tokenize`."""
    if tokenizer == "simple":
        return {key: [simple_tokenize(c) for c in texts] for key, texts in captions.items()}
    if tokenizer != "ptb":
        raise ValueError(f"tokenizer must be 'ptb' or 'simple', got {tokenizer!r}")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The PTB tokenizer reads one caption per line, so a newline inside a caption would shift every later one.
    wrapped = {key: [{"caption": " ".join(c.split())} for c in texts] for key, texts in captions.items()}
    with _java_stderr_logged():
        return PTBTokenizer().tokenize(wrapped)


@contextlib.contextmanager
def _java_stderr_logged():
    """Route what the PTB tokenizer's Java process writes to the inherited stderr into our log: its "tokenized N
    tokens" progress line at DEBUG, anything else (a Java error) as a warning."""
    with tempfile.TemporaryFile() as buffer:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(buffer.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buffer.seek(0)
            for line in buffer.read().decode(errors="replace").splitlines():
                if line.strip():
                    (logger.debug if "tokenized" in line else logger.warning)("PTB tokenizer: %s", line.strip())


def _check_captions(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> None:
    """Raise ValueError unless every prediction is one string for an image that has references."""
    if not predictions:
        raise ValueError("no caption predictions to evaluate")
    unknown = [key for key in predictions if key not in references]
    if unknown:
        raise ValueError(f"{len(unknown)} prediction(s) for images without reference captions, e.g. {unknown[:5]}")
    for key, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"prediction for image {key!r} must be one string, got {text!r}")
        if not references[key]:
            raise ValueError(f"image {key!r} has no reference captions")


def _scorers(metrics: Sequence[str]) -> list[tuple[str, Any]]:
    """pycocoevalcap scorer objects for the requested metric names, in METRICS order."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    factories = {"BLEU": lambda: Bleu(4), "METEOR": Meteor, "ROUGE-L": Rouge, "CIDEr": Cider}
    return [(name, factories[name]()) for name in METRICS if name in metrics]


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    metrics: Sequence[str] = METRICS,
    tokenizer: str = "auto",
) -> dict[str, Any]:
    """COCO caption metrics (x100) of one predicted caption per image against its reference captions.

    Args:
        predictions: image id -> generated caption; only these images are scored.
        references: image id -> human captions.
        metrics: any of ``BLEU`` (gives BLEU-1..4), ``METEOR``, ``ROUGE-L``, ``CIDEr``.
        tokenizer: ``ptb`` (needs Java), ``simple`` or ``auto`` (PTB when Java is there).

    Returns:
        ``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr`` as requested (``None`` for a metric that could
        not run), ``tokenizer`` (the one used), ``missing`` (metrics reported as ``None``), ``num_images``.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown caption metric(s) {unknown or list(metrics)}; choose from {list(METRICS)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {list(TOKENIZERS)}, got {tokenizer!r}")
    _check_captions(predictions, references)
    has_java = java_available()
    if tokenizer == "ptb" and not has_java:
        raise ValueError("tokenizer 'ptb' needs Java, and no 'java' is on PATH; install a JRE or use 'simple'")
    if tokenizer == "auto":
        tokenizer = "ptb" if has_java else "simple"
        if not has_java:
            logger.warning(
                "no 'java' on PATH: captions are tokenised with the simple tokenizer (lower-case, no punctuation) "
                "instead of the PTB tokenizer, and METEOR is reported as missing; install a JRE for official numbers"
            )
    missing = ["METEOR"] if "METEOR" in metrics and not has_java else []
    keys = list(predictions)
    # One tokenizer run for predictions and references: its start-up (a JVM) dominates on small sets.
    joined = {("ref", k): list(references[k]) for k in keys} | {("hyp", k): [predictions[k]] for k in keys}
    tokens = tokenize_captions(joined, tokenizer)
    gts = {i: tokens[("ref", k)] for i, k in enumerate(keys)}
    res = {i: tokens[("hyp", k)] for i, k in enumerate(keys)}

    out: dict[str, Any] = {}
    for name, scorer in _scorers([m for m in metrics if m not in missing]):
        if name == "BLEU":
            scores, _ = scorer.compute_score(gts, res, verbose=0)
            out.update({f"BLEU-{n + 1}": 100.0 * float(s) for n, s in enumerate(scores)})
        else:
            score, _ = scorer.compute_score(gts, res)
            out[name] = 100.0 * float(score)
    out.update({name: None for name in missing})
    return {**out, "tokenizer": tokenizer, "missing": missing, "num_images": len(keys)}


def load_coco_captions(path: str | Path) -> dict[Any, list[str]]:
    """Read reference captions from a COCO captions file (``annotations`` = ``[{"image_id", "caption"}]``)."""
    data = read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: expected an object with an 'annotations' list (COCO captions format)")
    references: dict[Any, list[str]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not is_id(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{path}: annotations[{i}] must have a number or string 'image_id' and a string "
                             f"'caption', got {ann!r:.200}")  # fmt: skip
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    return references


def load_caption_results(path: str | Path) -> dict[Any, str]:
    """Read a COCO caption results file ``[{"image_id": ..., "caption": ...}]``, one caption per image."""
    return read_results(path, "image_id", "caption")
