"""Image decoding for untrusted catalog bytes.

Every failure raises ``ImageError`` with a short reason; callers turn it into a row's
``status``/``error``. Decoding honours EXIF orientation and keeps the first frame of
animations, and converts to RGB exactly as the BLIP processors do
(``transformers.image_transforms.convert_to_rgb``: alpha composited on white). That
conversion is restated here, not imported: importing anything from transformers' image
code imports torch, seconds of start-up and hundreds of MB in every decode worker, which
never runs a model. A test checks the two give equal pixels for every mode.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The formats catalogs really carry. Restricting decoders keeps rarely used (and
# historically vulnerable) parsers such as PSD, FITS or PDF out of reach of hostile bytes.
Image.init()  # registers every plugin, so the allow-list below resolves to real decoders
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be decoded; the message is safe to store in ``error``."""


def open_image(data: bytes | None, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` fully (not lazily) into a Pillow image, honouring EXIF orientation.

    ``draft_size``: let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) while
    both sides stay at least this many pixels. Several times faster for photos much larger
    than the model's input, but the pixels differ slightly from a full decode, and so do the
    scores: an opt-in, never the default."""
    if data is None:
        raise ImageError("missing image")
    if len(data) == 0:
        raise ImageError("empty image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            image.seek(0)
            if draft_size and image.format in ("JPEG", "MPO"):
                image.draft(None, (draft_size, draft_size))  # square: EXIF rotation cannot shrink a side below it
            image.load()
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("unrecognised or unsupported image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError("image has no pixels")
    return image


def _scale_to_8_bit(image: Image.Image) -> Image.Image:
    """Map high-bit-depth grayscale to 8 bits by scaling; Pillow's own convert clips (Pillow #2574)."""
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and array.max(initial=0) > 255):
        # x / 257 rounded (65535 -> 255), in integers: 4 bytes a pixel instead of float64's 8,
        # which matters at Pillow's pixel limit (89 megapixels). No ties exist, so this equals rint.
        wide = np.clip(array, 0, 65535).astype(np.uint32)
        wide += 128
        wide //= 257
        return Image.fromarray(wide.astype(np.uint8), mode="L")
    # 32-bit integer or float pixels already in 0..255; clipped, or a negative value would wrap to white.
    array = np.clip(np.rint(array) if image.mode == "F" else array, 0, 255)
    return Image.fromarray(array.astype(np.uint8), mode="L")


def _composite_rgb(image: Image.Image) -> Image.Image:
    """``transformers.image_transforms.convert_to_rgb`` (5.23) for a Pillow image."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8, converted the way the BLIP processors convert."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _scale_to_8_bit(image)
    try:
        return np.array(_composite_rgb(image))
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot convert image to RGB: {exc}") from None


def decode_rgb(data: bytes | None, draft_size: int | None = None) -> np.ndarray:
    """Bytes to an RGB uint8 array; raises ``ImageError`` with the reason."""
    return to_rgb_array(open_image(data, draft_size))
