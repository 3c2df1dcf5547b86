"""JPEG decoding where the model runs (``--decode-device gpu``): bytes in, uint8 pixels at model
resolution out, on the model's device.

Why: a CPU decodes and resizes a 480x360 JPEG at about 175 images/s per core, so a GPU scoring
1,500-2,500 pairs/s needs 9 to 18 cores of decode tasks; nvJPEG decodes a batch on the GPU
(torchvision measured about 7,800 images/s on an A100 for 0.37 MP JPEGs, pytorch/vision #8496).

Two halves, as ``blip_ops.preprocess``: ``sniff_jpeg`` runs in the decode tasks (Pillow only, no
torch: it reads the headers, not the pixels) and decides which rows may travel as bytes; the
rest is ``DeviceJpegDecoder``, built once per model actor. It decodes a batch in one call, turns
it by its EXIF orientation (nvJPEG ignores EXIF), and resizes it with torch's antialiased bicubic
(the kernel torch wrote to follow Pillow's; close to Pillow's pixels, not equal to them:
BENCHMARKS.md measures the drift). A JPEG the device decoder refuses (CMYK, a progressive edge
case, corrupt data) is decoded again alone, and if refused again takes the CPU path
(``blip_ops.images.decode_rgb`` and Pillow's resize) with its ``ImageError`` rules.

The device is a parameter: on the CPU the same code runs through torchvision's CPU decoder, or
through the ``pil`` backend (Pillow's libjpeg-turbo, raw pixels without EXIF, refusing what
nvJPEG refuses), which is how the tests run where torchvision cannot be installed.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import ImageError, decode_rgb
from .preprocess import Resize

DECODE_DEVICES = ("cpu", "gpu")
BACKENDS = ("torchvision", "pil")
NO_ROTATION = 1  # EXIF orientation "top-left": the pixels as stored
_EOI, _SOS = b"\xff\xd9", b"\xff\xda"
log = logging.getLogger(__name__)


def sniff_jpeg(data: bytes | None) -> int | None:
    """The EXIF orientation (1-8) of a JPEG the device decoder may take, else None: the row is
    decoded on the CPU as before. Reads the headers only (tens of microseconds).

    None for: anything but a plain baseline or progressive 8-bit JPEG in RGB/YCbCr or grayscale
    (CMYK and YCCK, MPO, other formats), a size over Pillow's pixel limit, and bytes with no end
    marker after the first scan (truncated): the CPU path then gives these rows their usual
    ``image_error`` (or decodes them), so the error rules cannot drift between the paths. An end
    marker cannot occur inside entropy-coded data (a 0xFF there is always stuffed), and an EXIF
    thumbnail's lies before the first scan."""
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.width < 1 or image.height < 1:
                return None
            orientation = image.getexif().get(0x0112, NO_ROTATION)
    except Exception:  # any header Pillow cannot read is the CPU path's to report
        return None
    scan = data.find(_SOS)
    if scan < 0 or data.find(_EOI, scan) < 0:
        return None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else NO_ROTATION


def torchvision_problem() -> str | None:
    """Why torchvision's JPEG decoder cannot be used here, or None when it can."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # ImportError, or a build that does not match the installed torch
        return (
            f"--decode-device gpu needs torchvision (its nvJPEG decoder): cannot import it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); install the build matching your torch "
            "(pip install 'blip-moderate[gpu]') or use --decode-device cpu"
        )
    return None


def _torchvision_decode(tensors: list, device: str) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _pil_decode(tensors: list, device: str) -> list:
    """Stand-in with torchvision's list interface: raw decoded pixels (no EXIF), RGB, and a
    refusal (RuntimeError) for what nvJPEG refuses: CMYK and broken data."""
    import torch

    out = []
    for tensor in tensors:
        try:
            image = Image.open(io.BytesIO(tensor.numpy().tobytes()), formats=("JPEG",))
            image.load()
        except Exception as exc:
            raise RuntimeError(f"decode failed: {exc}") from None
        if image.mode not in ("RGB", "L"):
            raise RuntimeError(f"unsupported JPEG colour space {image.mode}")
        array = np.asarray(image.convert("RGB"))
        out.append(torch.from_numpy(array.transpose(2, 0, 1).copy()).to(device))
    return out


_DECODERS = {"torchvision": _torchvision_decode, "pil": _pil_decode}


def orient(pixels, orientation: int):
    """``(3, H, W)`` pixels turned as ``PIL.ImageOps.exif_transpose`` turns an image of that orientation."""
    import torch

    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(pixels, k=-1, dims=(-2, -1))
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(pixels, k=1, dims=(-2, -1))
    return pixels


def resize_on_device(images: list, height: int, width: int):
    """uint8 ``(3, H, W)`` tensors (any sizes) to one uint8 ``(n, 3, height, width)`` batch:
    antialiased bicubic in float32, rounded and clipped as Pillow's uint8 output is. Images of one
    size are resized in one call (a catalog's images often share a size)."""
    import torch

    device = images[0].device
    out = torch.empty((len(images), 3, height, width), dtype=torch.uint8, device=device)
    by_shape: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(index)
    for shape, rows in by_shape.items():
        batch = torch.stack([images[i] for i in rows]).float()
        if shape[1:] != (height, width):
            batch = torch.nn.functional.interpolate(batch, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        out[torch.as_tensor(rows, device=device)] = batch.round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass
class Decoded:
    """One batch's result: ``pixels[i]`` is row i's image where ``errors[i]`` is None."""

    pixels: object  # torch uint8 (n, 3, height, width) on the device
    errors: list
    on_device: int  # rows the device decoder took
    fell_back: int  # rows it refused that the CPU path decoded


class DeviceJpegDecoder:
    """Batched JPEG decode and resize on ``device`` for one checkpoint's input size."""

    def __init__(self, resize: Resize, device: str, backend: str = "torchvision"):
        if backend not in _DECODERS:
            raise ValueError(f"JPEG backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        # Checked here, in the actor: a worker without torchvision would otherwise send every row down
        # the per-row fallback, correct but at CPU speed and without a word.
        problem = torchvision_problem() if backend == "torchvision" else None
        if problem:
            raise RuntimeError(problem)
        self.resize = resize
        self.device = device
        self.backend = backend
        self._decode = _DECODERS[backend]
        # Rows decoded on the device, refused there but decoded by the CPU path, decoded by neither.
        self.counts = {"on_device": 0, "fell_back": 0, "failed": 0}

    def _device_decode(self, tensors: list) -> list:
        """Decoded tensors, None where the decoder refused one: the batch in one call, and only
        when that call fails, row by row to find the refused ones."""
        try:
            return list(self._decode(tensors, self.device))
        except Exception:
            pass
        out = []
        for tensor in tensors:
            try:
                out.append(self._decode([tensor], self.device)[0])
            except Exception:
                out.append(None)
        return out

    def decode(self, blobs: list[bytes], orientations: list[int]) -> Decoded:
        import torch

        height, width = self.resize.height, self.resize.width
        if not blobs:
            return Decoded(torch.empty((0, 3, height, width), dtype=torch.uint8, device=self.device), [], 0, 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # read only, by the decoder
            tensors = [torch.from_numpy(np.frombuffer(blob, dtype=np.uint8)) for blob in blobs]
        decoded = self._device_decode(tensors)
        images, errors, on_device, fell_back = [], [None] * len(blobs), 0, 0
        for index, (pixels, blob, orientation) in enumerate(zip(decoded, blobs, orientations)):
            if pixels is not None and pixels.ndim == 3 and pixels.shape[0] == 3:
                images.append(orient(pixels, orientation))
                on_device += 1
                continue
            try:  # the CPU path for this row: Pillow decode (EXIF honoured) and Pillow resize
                rgb = decode_rgb(blob)
                images.append(torch.from_numpy(self.resize.resize(rgb)).to(self.device))
                fell_back += 1
            except ImageError as exc:
                errors[index] = str(exc)
                images.append(torch.zeros((3, height, width), dtype=torch.uint8, device=self.device))
            except Exception as exc:  # as decode_batch: a decoder bug costs one row
                errors[index] = f"image could not be decoded: {type(exc).__name__}: {exc}"
                images.append(torch.zeros((3, height, width), dtype=torch.uint8, device=self.device))
        if fell_back and not self.counts["fell_back"]:  # once per actor: a catalog whose JPEGs the device refuses
            log.warning("%s JPEG decoder (%s) refused %d of %d JPEGs; decoded on the CPU instead (counted in .counts)",
                        self.backend, self.device, fell_back, len(blobs))
        self.counts["on_device"] += on_device
        self.counts["fell_back"] += fell_back
        self.counts["failed"] += sum(e is not None for e in errors)
        return Decoded(resize_on_device(images, height, width), errors, on_device, fell_back)
