"""JPEG draft decoding (``--jpeg-draft``) against the full decode: time per image and pixel drift.

    python -m benchmarks.jpeg_draft

Photo-like JPEGs (smooth gradients, shapes, sensor-like noise; quality 90) at several sizes
are decoded and resized to 384x384 uint8, as a decode worker does, once with a full decode
and once with the draft decode (1/2, 1/4 or 1/8 scale, never below 384 a side). Reported per
size: milliseconds per image on one thread for each, their ratio, and how far the resized
pixels moved (mean and largest absolute difference in 0..255 levels, and the share of values
that moved more than 8 levels). Score drift is not reported: only random-weight checkpoints
can be built here, and their scores say nothing about a trained model's.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from blip_ops.images import decode_rgb
from blip_ops.preprocess import Resize

SIZES = [(640, 480), (1600, 1200), (4000, 3000)]


def photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randint(0, width), rng.randint(0, height)
        r = rng.randint(min(width, height) // 20, min(width, height) // 4)
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.randint(0, 256, 3)))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def per_image_ms(blobs: list[bytes], resize: Resize, draft: int | None, repeats: int) -> tuple[float, list[np.ndarray]]:
    out = [resize.resize(decode_rgb(b, draft)) for b in blobs]  # warm-up, and the pixels
    started = time.perf_counter()
    for _ in range(repeats):
        for blob in blobs:
            resize.resize(decode_rgb(blob, draft))
    return (time.perf_counter() - started) * 1000 / (repeats * len(blobs)), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="distinct images per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=384, help="model input side (BLIP ITM: 384, BLIP-2: 224)")
    args = parser.parse_args(argv)
    resize = Resize(args.size, args.size, 3)  # BLIP's: bicubic to a fixed square
    for width, height in SIZES:
        blobs = [photo(width, height, seed) for seed in range(args.images)]
        full_ms, full = per_image_ms(blobs, resize, None, args.repeats)
        draft_ms, draft = per_image_ms(blobs, resize, args.size, args.repeats)
        moved = np.abs(np.stack(full).astype(np.int16) - np.stack(draft).astype(np.int16))
        decoded = decode_rgb(blobs[0], args.size).shape[1::-1]
        print(json.dumps({
            "jpeg": f"{width}x{height}",
            "draft_decodes_at": f"{decoded[0]}x{decoded[1]}",
            "full_ms_per_image": round(full_ms, 1),
            "draft_ms_per_image": round(draft_ms, 1),
            "speedup": round(full_ms / draft_ms, 2),
            "pixel_mean_abs_diff": round(float(moved.mean()), 2),
            "pixel_max_abs_diff": int(moved.max()),
            "share_moved_over_8_levels": round(float((moved > 8).mean()), 4),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
