"""The evidence map drawn over its image, for people: ``overlay(image, evidence) -> PIL.Image``.

LAVIS's ``getAttMap`` recipe (``lavis/common/gradcam.py``): min-max normalise the raw map,
upsample it bicubically to the image, blur it (Gaussian, sigma 2% of the longer side), normalise
again, colour it and blend it in with an opacity of ``value ** 0.7``, so cold patches leave the
image untouched and hot ones show their colour. Two changes: the colormap is inferno
(perceptually uniform and readable in greyscale) instead of jet, stopped short of its palest
yellow so heat stays visible on white backgrounds, and the hottest opacity is capped so the
object under the heat stays visible. BLIP resizes images to a square without
keeping their aspect, so the patch grid stretched over the original image lands where the model
looked. Pillow and numpy only: the report and notebooks draw it without torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .images import decode_rgb

# matplotlib's inferno (CC0), every 32nd of its 256 entries; interpolated linearly in between.
_INFERNO = np.array([
    [0.001462, 0.000466, 0.013866], [0.129285, 0.047293, 0.290788], [0.341500, 0.062325, 0.429425],
    [0.540920, 0.134729, 0.415123], [0.735683, 0.215906, 0.330245], [0.894305, 0.353399, 0.193584],
    [0.978422, 0.557937, 0.034931], [0.974638, 0.797692, 0.206332], [0.988362, 0.998364, 0.644924],
])
MAX_OPACITY = 0.8
# Inferno's last tenth is a pale yellow that vanishes on the white backgrounds of product photos;
# the hottest patch is drawn in its orange-yellow instead.
HOTTEST = 0.9
BLUR_FRACTION = 0.02  # LAVIS: sigma = 0.02 * max(H, W)
WORK_PX = 256
LEGEND_MIN_PX = 120


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to uint8 RGB (inferno)."""
    positions = np.linspace(0.0, 1.0, len(_INFERNO))
    clipped = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(clipped, positions, _INFERNO[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _field(evidence, name):
    return evidence[name] if isinstance(evidence, dict) else getattr(evidence, name)


def _normalised(values: np.ndarray) -> np.ndarray | None:
    values = values - values.min()
    peak = values.max()
    return values / peak if peak > 0 else None


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge reflection (Pillow's blur takes 8-bit images only)."""
    if sigma <= 0:
        return values
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(values, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        values = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="valid"), axis, padded)
    return values


def _resized(values: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BICUBIC)
    # Bicubic rings below 0 and above 1 around a hot patch; unclipped, renormalising would tint cold ones.
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def heat_at(evidence, width: int, height: int) -> np.ndarray | None:
    """The map at ``width x height``: normalised, bicubic, blurred, normalised again; None for a flat map."""
    rows, cols = int(_field(evidence, "rows")), int(_field(evidence, "cols"))
    heat = np.asarray(_field(evidence, "heat"), dtype=np.float32)
    if heat.size != rows * cols:
        raise ValueError(f"evidence heat has {heat.size} values for a {rows}x{cols} grid")
    grid = _normalised(heat.reshape(rows, cols))
    if grid is None:
        return None
    # Blurred at no more than WORK_PX on the long side, then resized: the field is smooth by then,
    # and a photo-sized blur would cost seconds.
    scale = min(1.0, WORK_PX / max(width, height))
    work_w, work_h = max(1, round(width * scale)), max(1, round(height * scale))
    blurred = _blur(_resized(grid, work_w, work_h), BLUR_FRACTION * max(work_w, work_h))
    full = blurred if (work_w, work_h) == (width, height) else _resized(blurred, width, height)
    return _normalised(full)


def _as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    # Encoded bytes are untrusted: the same guarded decoder as scoring.
    return Image.fromarray(decode_rgb(bytes(image)))


def legend(width: int, height: int = 14) -> Image.Image:
    """A strip: the colormap from low to high, labelled."""
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    margin = 28
    bar = colormap(np.linspace(0.0, HOTTEST, max(1, width - 2 * margin)))[None, :, :].repeat(max(1, height - 4), axis=0)
    strip.paste(Image.fromarray(bar), (margin, 2))
    draw = ImageDraw.Draw(strip)
    draw.text((2, max(0, height // 2 - 6)), "low", fill=(60, 60, 60))
    draw.text((width - margin + 3, max(0, height // 2 - 6)), "high", fill=(60, 60, 60))
    return strip


def overlay(image, evidence, *, max_size: int | None = None, show_legend: bool = True) -> Image.Image:
    """``image`` (a Pillow image, an RGB array or encoded bytes) with ``evidence`` (an output row's
    ``evidence`` struct as a dict, or a ``blip_ops.evidence.Evidence``) drawn over it.

    ``max_size`` shrinks the image first (thumbnails); ``show_legend`` adds the colour strip below.
    A flat map (no patch more relevant than another) leaves the image as it is.
    """
    picture = _as_image(image)
    if max_size:
        picture.thumbnail((max_size, max_size))
    width, height = picture.size
    heat = heat_at(evidence, width, height)
    if heat is not None:
        base = np.asarray(picture, dtype=np.float32)
        opacity = (MAX_OPACITY * heat ** 0.7)[..., None]
        blended = (1 - opacity) * base + opacity * colormap(HOTTEST * heat).astype(np.float32)
        picture = Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8))
    if not show_legend:
        return picture
    strip = legend(max(width, LEGEND_MIN_PX))  # wider than a narrow thumbnail, so its labels fit
    canvas = Image.new("RGB", (strip.width, height + strip.height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(strip, (0, height))
    return canvas
