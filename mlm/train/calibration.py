"""Calibration data for pruning (:mod:`mlm.compress.prune`): a fixed, evenly spread sample of a data source in the
model's own transforms.

Records are taken at evenly spaced positions of the source (so caption and VQA records both appear whatever their
order), with the evaluation transforms and each record's first caption: the same batches on every call. The loss
they are scored by is the run's training objective without the auxiliary word and matching heads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mlm.config import Config, config_from_dict


def run_settings(model, folder: Path) -> Config:
    """The config of the run that trained the model (when the folder has one beside it), with the model's own
    settings; otherwise the defaults."""
    from mlm.run_folder import run_config

    saved = run_config(folder)
    config = config_from_dict(saved) if saved else Config()
    config.model = model.config
    return config


def calibration_batches(model, config: Config, spec: str, split: str, n_batches: int, batch_size: int) -> list[dict]:
    """``n_batches`` batches of ``batch_size`` records spread evenly over the source ``spec`` (split ``split``)."""
    from mlm.data.collate import Collate
    from mlm.data.dataset import build_dataset
    from mlm.train.setup import open_split

    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"--calib-batches {n_batches} and --calib-batch-size {batch_size} must be >= 1")
    if model.tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json: calibration needs it to read the text")
    source = open_split(config, spec, split)
    dataset = build_dataset(source, model.tokenizer, config, train=False)
    n = min(len(dataset), n_batches * batch_size)
    index = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    loader = DataLoader(Subset(dataset, index), batch_size=batch_size, collate_fn=Collate(model.tokenizer.pad_id))
    device = model.device
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in loader]


def calibration_loss(config: Config):
    """The run's objective for ranking units: contrastive + caption + VQA, at the run's weights."""
    from mlm.train.losses import ImageTextLoss

    train = dataclasses.replace(config.train, word_weight=0.0, match_weight=0.0, swap_negatives=0, exit_weight=0.0)
    return ImageTextLoss.from_config(train)


@torch.no_grad()
def heldout_loss(model, config: Config, batches: list[dict]) -> float:
    """Mean of the run's objective (as :func:`calibration_loss`) over fixed batches, model in eval mode: a loss that
    two runs can be compared by without the noise of their last training batches."""
    loss_fn = calibration_loss(config)
    model.eval()
    total = 0.0
    for batch in batches:
        out = model(batch["images"], batch["text_ids"], batch["text_mask"])
        total += float(loss_fn(out, batch)[0])
    return total / max(1, len(batches))
