"""Drawing the synthetic scenes: colours, sizes and backgrounds in pixels, and the PIL renderer.

Everything here is a pure function of its arguments and the image's own ``random.Random``, so a scene renders to
the same bytes whatever process draws it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from mlm.data.synthetic import SceneObject

COLORS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "cyan": (40, 220, 230),
    "blue": (30, 60, 230),
    "purple": (150, 40, 190),
    "white": (250, 250, 250),
}
SIZES = {"small": 0.26, "large": 0.44}  # radius as a fraction of the grid cell
BACKGROUNDS = ((120, 120, 120), (95, 105, 100), (150, 140, 125), (105, 100, 125), (135, 145, 150), (85, 85, 85))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with radius r."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + a * np.cos(t), cy - a * np.sin(t)) for a, t in zip(radii, angles, strict=True)]
    w = 0.36 * r  # cross: a plus sign with arms of half-width w
    return [
        (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
        (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
    ]  # fmt: skip


def _background(rng: random.Random, index: int, size: int) -> Image.Image:
    """A muted background: plain, a vertical or horizontal gradient, or fine noise."""
    base = np.array(BACKGROUNDS[index], dtype=np.int16)
    style = rng.randrange(4)
    if style == 0:
        return Image.new("RGB", (size, size), BACKGROUNDS[index])
    if style in (1, 2):
        ramp = np.linspace(-25, 25, size).astype(np.int16)
        field = np.broadcast_to(ramp[:, None] if style == 1 else ramp[None, :], (size, size))  # (S, S)
    else:
        # uniform noise in [-12, 13] from the image's own generator (cheaper than numpy's, and as deterministic)
        noise = np.frombuffer(rng.randbytes(size * size), dtype=np.uint8).reshape(size, size)
        field = noise.astype(np.int16) // 10 - 12  # (S, S)
    arr = base[None, None, :] + field[:, :, None]  # (S, S, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render(objects: list[SceneObject], background: int, size: int, rng: random.Random) -> Image.Image:
    """Draw the scene on a size x size canvas; positions jitter slightly inside their cell."""
    img = _background(rng, background, size)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for obj in objects:
        r = SIZES[obj.size] * cell
        jitter = (0.5 - SIZES[obj.size]) * cell * 0.5
        cx = (obj.col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (obj.row + 0.5) * cell + rng.uniform(-jitter, jitter)
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif obj.shape == "square":
            s = 0.85 * r
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=color)
    return img
