"""A small synthetic catalog: drawn shapes with matching, mismatched and broken records."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (240, 210, 30)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(color: str, shape: str, size: tuple[int, int] = (96, 80), fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(w * 0.5, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=COLORS[color])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_catalog(n: int = 36, seed: int = 0) -> list[dict]:
    """Records with ``id``, ``text``, ``image`` and ``expected`` (match, mismatch, image_error, text_error)."""
    rng = random.Random(seed)
    records = []
    for index in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        kind = "match"
        text = f"a {color} {shape}"
        image = draw_shape(color, shape, size=(rng.randint(40, 160), rng.randint(40, 160)))
        if index % 4 == 1:
            other_color = rng.choice([c for c in COLORS if c != color])
            other_shape = rng.choice([s for s in SHAPES if s != shape])
            text, kind = f"a {other_color} {other_shape}", "mismatch"
        elif index % 12 == 6:
            image, kind = b"not an image at all", "image_error"
        elif index % 12 == 10:
            text, kind = "   ", "text_error"
        records.append({"id": f"item-{index:04d}", "text": text, "image": image, "expected": kind})
    return records
