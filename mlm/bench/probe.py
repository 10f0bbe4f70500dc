"""``mlm bench probe``: how much of each object's shape a model's image states hold, by linear probes.

On a folder written by ``mlm data synth`` the scenes are known: every cell of the 3x3 layout holds one of six
shapes or nothing. The image states of each encoder level (and the final states the decoder reads) are averaged per
cell and a linear classifier is trained on the training split with the encoder frozen, then scored on the test
split's occupied cells. ``--train-encoder`` instead trains the encoder and the linear head together for the same
budget: the accuracy the architecture reaches when shape is supervised directly. The gap between the two says how
much shape the training objectives put into the states.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mlm bench probe`` (``--json OUT`` is added by the bench command)."""
    parser.add_argument("--checkpoint", help="a trained model (default: a fresh model of --config)")
    parser.add_argument("--config", default="configs/tiny-synthetic.yaml", help="model config when no checkpoint")
    parser.add_argument("--data", default="data/synth", help="a folder written by `mlm data synth`")
    parser.add_argument("--budget-s", type=float, default=60.0, help="training seconds per probe (default: 60)")
    parser.add_argument("--train-encoder", action="store_true", help="train the encoder too (direct supervision)")


def _cells(data: Path, split: str, transform):
    """Pixels (N, 3, H, W) and per-cell labels (N, 9): the shape index, or 6 for an empty cell."""
    import torch
    from PIL import Image

    from mlm.data.synthetic import SHAPES, sample_scene

    captions = json.loads((data / f"captions_{split}.json").read_text())
    seed, holdout = captions["info"]["seed"], bool(captions["info"]["holdout"])
    pixels, labels = [], []
    for image in captions["images"]:
        objects = sample_scene(random.Random(f"mlm-synth:{seed}:{image['id']}"), split, holdout)[0]
        label = torch.full((9,), len(SHAPES), dtype=torch.long)
        for obj in objects:
            label[obj.row * 3 + obj.col] = SHAPES.index(obj.shape)
        with Image.open(data / "images" / image["file_name"]) as img:
            pixels.append(transform(img.convert("RGB")))
        labels.append(label)
    return torch.stack(pixels), torch.stack(labels)


def _cell_features(model, pixels):
    """{level or "final": (B, 9, C)} image states averaged over each cell of the 3x3 layout."""
    import torch.nn.functional as F

    out = model.encoder.encode_image(pixels)
    rows, cols = model.encoder.grid
    states = {**out.levels, "final": out.tokens}
    cells = {}
    for name, x in states.items():
        grid = x.view(x.shape[0], rows, cols, -1).permute(0, 3, 1, 2)  # (B, C, rows, cols)
        cells[name] = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (B, 9, C)
    return cells


def _probe(model, name: str, train, test, budget_s: float, train_encoder: bool) -> dict:
    """Train a linear head on one state's cells for the budget; accuracy over the test split's occupied cells."""
    import torch
    import torch.nn.functional as F

    (x_train, y_train), (x_test, y_test) = train, test
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.dim, 7)
    params = list(head.parameters()) + (list(model.encoder.parameters()) if train_encoder else [])
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    model.train(train_encoder)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        rows = torch.randint(0, len(x_train), (64,), generator=generator)
        with torch.set_grad_enabled(train_encoder):
            features = _cell_features(model, x_train[rows])[name]
        loss = F.cross_entropy(head(features).flatten(0, 1), y_train[rows].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([head(_cell_features(model, x_test[i : i + 100])[name]).argmax(-1)
                               for i in range(0, len(x_test), 100)])  # fmt: skip
    occupied = y_test < 6
    accuracy = 100.0 * float((predicted[occupied] == y_test[occupied]).float().mean())
    return {"accuracy": round(accuracy, 1), "steps": steps}


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Probe every level's states (frozen) or train encoder + head; return the report and a table."""
    from mlm.config import load_config
    from mlm.data.transforms import build_transform
    from mlm.inference import load_model
    from mlm.model import MLMModel

    data = Path(args.data)
    if not (data / "captions_train.json").is_file():
        raise FileNotFoundError(f"{data}: not a folder written by `mlm data synth` (no captions_train.json)")
    model = load_model(args.checkpoint, "cpu") if args.checkpoint else MLMModel(load_config(args.config).model)
    transform = build_transform(model.config.image_size, train=False)
    train, test = _cells(data, "train", transform), _cells(data, "test", transform)
    names = ["final"] if args.train_encoder else [*model.encoder.level_outputs, "final"]
    results = {name: _probe(model, name, train, test, args.budget_s, args.train_encoder) for name in names}
    report = {"checkpoint": args.checkpoint, "train_encoder": args.train_encoder, "budget_s": args.budget_s,
              "chance": round(100.0 / 6, 1), "probes": results}  # fmt: skip
    kind = "encoder + linear head trained" if args.train_encoder else "linear probe, encoder frozen"
    lines = [f"shape of each object from its cell's image states ({kind}, {args.budget_s:g} s each; chance 16.7)",
             "| states | accuracy | steps |", "| --- | ---: | ---: |"]  # fmt: skip
    lines += [f"| {name} | {r['accuracy']:.1f} | {r['steps']} |" for name, r in results.items()]
    return report, "\n".join(lines)
