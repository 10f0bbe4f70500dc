"""Zero-shot classification: class names in prompt templates give one text embedding per class (CLIP, Radford et
al., 2021); each image goes to the class whose embedding is closest to its own.

The classes come from an ImageFolder tree (one sub-folder per class, as torchvision reads it) or from a CSV/TSV
file with an image-path column and a label column. Templates come from ``--templates FILE``, else from templates a
dataset ships beside itself (``templates.txt`` inside an image folder, ``NAME_templates.txt`` beside ``NAME.csv``),
else from :data:`DEFAULT_TEMPLATES`. Each class embedding is the normalised mean of its normalised template
embeddings (the prompt ensembling of CLIP).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlm.data.records import NOT_AN_IMAGE, DataError

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a close-up photo of a {}.",
)
TOP_K = 5


@dataclass
class ClassificationSet:
    """Images with integer labels into ``classes``, and the templates file the data ships (if any)."""

    images: list[Path]
    labels: list[int]
    classes: list[str]
    source: Path
    templates_file: Path | None = None


def read_templates(path: str | Path) -> list[str]:
    """Templates from a text file, one per line with one ``{}`` (or CLIP_benchmark's ``{c}``) where the class name
    goes; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--templates: no such file: {path}")
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip().replace("{c}", "{}")
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1 or "{" in line.replace("{}", "") or "}" in line.replace("{}", ""):
            raise ValueError(f"{path}:{number}: a template needs exactly one {{}} where the class name goes: {line!r}")
        templates.append(line)
    if not templates:
        raise ValueError(f"{path}: no templates in it (one per line, with {{}} where the class name goes)")
    return templates


def open_classification(
    spec: str | Path, image_column: str = "filepath", label_column: str = "label"
) -> ClassificationSet:
    """Read an ImageFolder tree or a CSV/TSV of (image path, label); paths are relative to the CSV's folder."""
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        return _table(path, image_column, label_column)
    if not path.exists():
        raise FileNotFoundError(f"--data: no such file or folder: {path}")
    raise ValueError(f"--data {path}: zero-shot reads an image folder (one sub-folder per class) or a .csv/.tsv file")


def _image_folder(root: Path) -> ClassificationSet:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, index = find_classes(str(root))
        samples = make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as err:
        raise ValueError(f"--data {root}: {err} (zero-shot needs one sub-folder of images per class)") from None
    if not samples:
        raise ValueError(f"--data {root}: no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    templates = root / "templates.txt"
    images, labels = [Path(p) for p, _ in samples], [c for _, c in samples]
    return ClassificationSet(images, labels, classes, root, templates if templates.is_file() else None)


def _table(path: Path, image_column: str, label_column: str) -> ClassificationSet:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = [c for c in (image_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(reader.fieldnames or [])}); "
                "choose them with --image-column / --label-column"
            )
        rows = []
        for row in reader:
            image, label = (row[image_column] or "").strip(), (row[label_column] or "").strip()
            if not image or not label:
                raise ValueError(f"{path}:{reader.line_num}: empty {image_column if not image else label_column}")
            rows.append((path.parent / image, label, reader.line_num))
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    for image, _, line in rows:
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{line}: no such image: {image}")
    classes = sorted({label for _, label, _ in rows})
    index = {name: i for i, name in enumerate(classes)}
    templates = path.with_name(f"{path.stem}_templates.txt")
    return ClassificationSet(
        [image for image, _, _ in rows],
        [index[label] for _, label, _ in rows],
        classes,
        path,
        templates if templates.is_file() else None,
    )


def prompt_name(class_name: str) -> str:
    """How a class name reads in a prompt: folder-style underscores become spaces."""
    return class_name.replace("_", " ").strip()


@torch.no_grad()
def class_embeddings(model, classes: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, E) L2-normalised class embeddings: the mean of each class's normalised template embeddings."""
    from mlm.inference import embed_texts

    prompts = [template.format(prompt_name(name)) for name in classes for template in templates]
    embeds = embed_texts(model, prompts).view(len(classes), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(embeds, dim=-1)


def unknown_words(model, classes: Sequence[str]) -> list[str]:
    """Class names with a word the model's tokenizer maps to [UNK] (their prompts cannot name them)."""
    return [name for name in classes if model.tokenizer.cannot_spell(prompt_name(name))]


def zeroshot_metrics(logits: Tensor, labels: Tensor, classes: Sequence[str]) -> dict:
    """Top-1/top-k accuracy, per-class accuracy, their mean and the confusion matrix (rows: true class), in %."""
    n_classes = len(classes)
    k = min(TOP_K, n_classes)
    topk = logits.topk(k, dim=1).indices  # (N, k)
    predicted = topk[:, 0]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    per_class = {
        name: round(100.0 * confusion[i, i].item() / support[i].item(), 2)
        for i, name in enumerate(classes)
        if support[i] > 0
    }
    return {
        "top1": round(100.0 * (predicted == labels).float().mean().item(), 2),
        f"top{k}": round(100.0 * (topk == labels[:, None]).any(dim=1).float().mean().item(), 2),
        "mean_per_class": round(sum(per_class.values()) / max(len(per_class), 1), 2),
        "num_images": int(labels.numel()),
        "num_classes": n_classes,
        "per_class": per_class,
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def zeroshot_classify(model, data: ClassificationSet, templates: Sequence[str], batch_size: int = 128) -> dict:
    """Classify every image of ``data``; returns :func:`zeroshot_metrics` plus the templates and skipped images."""
    from mlm.inference import embed_images, image_batches, image_transform

    unknown = unknown_words(model, data.classes)
    if unknown:
        logger.warning("the tokenizer does not know a word of %d class name(s): %s", len(unknown), ", ".join(unknown))
    weights = class_embeddings(model, data.classes, templates)  # (C, E)
    errors: dict[int, str] = {}
    kept, logits = [], []
    for indices, pixels in image_batches(data.images, image_transform(model), batch_size, errors=errors):
        kept += indices
        logits.append(embed_images(model, pixels) @ weights.T)  # cosine similarities (b, C)
    for index, message in sorted(errors.items()):
        logger.warning("skipped %s: %s", data.images[index], message)
    if not kept:
        raise DataError(NOT_AN_IMAGE, str(data.source), f"none of its {len(data.images)} images could be read")
    labels = torch.tensor([data.labels[i] for i in kept])
    metrics = zeroshot_metrics(torch.cat(logits), labels, data.classes)
    metrics.update(templates=list(templates), skipped_images=len(errors), unknown_class_words=unknown)
    return metrics


def choose_templates(data: ClassificationSet, templates_path: str | Path | None) -> list[str]:
    """The templates to use: ``--templates``, else the dataset's own file, else the defaults."""
    if templates_path:
        return read_templates(templates_path)
    if data.templates_file is not None:
        logger.info("using the templates in %s", data.templates_file)
        return read_templates(data.templates_file)
    return list(DEFAULT_TEMPLATES)
