"""A tiny run learns shape: trained with the usual objectives on captions that name only the shape, it tells a
circle from a square in held-out images far above chance within a bounded number of steps."""

import random

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_run import tiny_config

from mlm.inference import embed_images, embed_texts, image_transform, load_model
from mlm.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = ("circle", "square")
COLORS = ((220, 40, 40), (40, 160, 60), (50, 80, 220), (230, 200, 40))


def draw(shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One filled circle or square of a random colour, size and place on a random grey."""
    grey = rng.randrange(0, 90)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    side = rng.randrange(14, 22)
    x, y = rng.randrange(1, size - side), rng.randrange(1, size - side)
    box, color = (x, y, x + side, y + side), rng.choice(COLORS)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=color)
    return image


def write_split(folder, n: int, seed: int) -> list[tuple[str, str]]:
    """n images, half of each shape, and a filepath/title table of "a circle." / "a square." captions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        shape = SHAPES[i % 2]
        draw(shape, rng).save(folder / f"{i:04d}.png")
        rows.append((f"{i:04d}.png", shape))
    lines = ["filepath\ttitle"] + [f"{name}\ta {shape}." for name, shape in rows]
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("steps", "switches", "least"),
    [
        (600, [], 0.7),  # measured 0.83 (0.73 after 300 steps)
        (300, ["model.word_head=true", "model.word_head_patches=true", "train.word_weight=1"], 0.8),  # 0.92
    ],
    ids=["shipped-objectives", "per-patch-words"],
)
def test_a_tiny_run_tells_a_circle_from_a_square(tmp_path, steps, switches, least):
    write_split(tmp_path / "train", 256, seed=0)
    held_out = write_split(tmp_path / "test", 64, seed=1)
    config = tiny_config(tmp_path / "train" / "captions.tsv", tmp_path / "run", f"train.max_steps={steps}",
                         "train.batch_size=32", "train.warmup_steps=10", "train.lr=3e-3", "train.log_every=25",
                         "data.augment=false", *switches)  # fmt: skip
    train(config)
    model = load_model(tmp_path / "run")
    transform = image_transform(model)
    pixels = torch.stack([transform(Image.open(tmp_path / "test" / name).convert("RGB")) for name, _ in held_out])
    with torch.no_grad():
        scores = embed_images(model, pixels) @ embed_texts(model, [f"a {shape}." for shape in SHAPES]).T  # (64, 2)
    predicted = [SHAPES[i] for i in scores.argmax(dim=1).tolist()]
    accuracy = sum(p == shape for p, (_, shape) in zip(predicted, held_out, strict=True)) / len(held_out)
    assert accuracy >= least  # chance 0.5
