"""The checkpoint's own image preprocessing, split into a CPU half and a model half.

The CPU half (``Resize``) turns an RGB array into uint8 pixels at model resolution, which is
cheap to ship between workers (a quarter of float32). It runs in the decode workers, which
never run a model, so it uses Pillow and numpy only and reads its settings from the
checkpoint's processor config files (``Resize.read``): any import of transformers' image code
imports torch, which costs every decode worker seconds of start-up and hundreds of MB.
The model half (``ImagePreparer.to_device_pixel_values``) rescales and normalises with torch.

Together they compute what the checkpoint's processor computes in one call. Tests compare
both halves with the processor, and every model actor checks that the settings read from the
files are the ones its processor loaded (``check_resize_settings``), so a reading that
drifted from transformers' would stop the run rather than change a score.
"""

from __future__ import annotations

import enum
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import model_cache
from .checkpoints import CheckpointError, is_local_reference, load_image_processor, local_checkpoint

# Processor types whose preprocessing is exactly: convert to RGB, resize to a fixed
# height x width with one Pillow filter, rescale, normalise (BLIP and BLIP-2 both use it).
BLIP_IMAGE_PROCESSORS = frozenset({"BlipImageProcessor", "BlipImageProcessorFast", "BlipImageProcessorPil"})


@dataclass(frozen=True)
class Resize:
    height: int
    width: int
    resample: int  # a Pillow filter; BLIP's is 3, bicubic

    @property
    def num_bytes(self) -> int:
        return 3 * self.height * self.width

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB to ``(3, height, width)`` uint8 at model resolution."""
        # What transformers.image_transforms.resize does with uint8 pixels: one Pillow resize
        # with no reducing gap, no rescaling around it.
        resized = Image.fromarray(rgb).resize((self.width, self.height), resample=self.resample, reducing_gap=None)
        return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))

    def from_bytes(self, buffer: bytes) -> np.ndarray:
        return np.frombuffer(buffer, dtype=np.uint8).reshape(3, self.height, self.width)

    @classmethod
    def from_processor(cls, image_processor) -> "Resize":
        size = image_processor.size
        if (
            not image_processor.do_resize
            or getattr(image_processor, "do_center_crop", None)
            or getattr(image_processor, "do_pad", None)
            or not (size.get("height") and size.get("width"))
        ):
            raise CheckpointError(
                f"unsupported image preprocessing ({type(image_processor).__name__}, size {dict(size)}): "
                "BLIP models take images resized to one fixed height and width"
            )
        return cls(int(size["height"]), int(size["width"]), int(image_processor.resample))

    @classmethod
    def from_settings(cls, settings: dict) -> "Resize | None":
        """From a saved image processor config; None unless it plainly describes BLIP's resize."""
        size, resample = settings.get("size"), settings.get("resample")
        if isinstance(size, int):
            size = {"height": size, "width": size}  # BLIP processors resize an int size to a square
        if (
            settings.get("image_processor_type") not in BLIP_IMAGE_PROCESSORS
            or settings.get("do_resize") is not True
            or settings.get("do_center_crop")
            or settings.get("do_pad")
            or not isinstance(size, dict)
            or {k for k, v in size.items() if v is not None} != {"height", "width"}
            or not all(isinstance(size[k], int) and size[k] > 0 for k in ("height", "width"))
            or not (isinstance(resample, int) and 0 <= resample <= 5)
        ):
            return None
        return cls(size["height"], size["width"], resample)

    @classmethod
    def read(cls, reference: str) -> "Resize | None":
        """The checkpoint's resize from its files, without transformers; None where they do not say plainly."""
        settings = _saved_image_processor_settings(reference)
        return cls.from_settings(settings) if settings is not None else None


def resize_for(reference: str) -> Resize:
    """The checkpoint's resize: read from its files, else from its processor loaded by transformers."""
    return Resize.read(reference) or Resize.from_processor(load_image_processor(reference))


def check_resize_settings(reference: str, image_processor) -> None:
    """Refuse to run when the decode workers' reading of the files disagrees with the processor."""
    read = Resize.read(reference)
    loaded = Resize.from_processor(image_processor)
    if read is not None and read != loaded:
        raise CheckpointError(
            f"{reference}: image settings read from the config files ({read}) differ from the ones "
            f"transformers loaded ({loaded}); refusing to score with preprocessing that differs from the checkpoint's"
        )


def _load_json(path: "Path | _Missing | None") -> dict | None:
    if not isinstance(path, Path) or not path.is_file():  # not known, or known missing
        return None
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # transformers will report it properly on the fallback path
    return loaded if isinstance(loaded, dict) else None


def _saved_image_processor_settings(reference: str) -> dict | None:
    """transformers' order: the ``image_processor`` entry of ``processor_config.json`` (the layout
    ``save_pretrained`` writes since 5.0), else ``preprocessor_config.json`` (older checkpoints)."""
    processor_config = _checkpoint_file(reference, "processor_config.json")
    if processor_config is None:
        return None  # not known whether a nested config exists, so not known which file wins
    nested = _load_json(processor_config) or {}
    if isinstance(nested.get("image_processor"), dict):
        return nested["image_processor"]
    return _load_json(_checkpoint_file(reference, "preprocessor_config.json"))


class _Missing(enum.Enum):
    """A checkpoint file known not to exist, as opposed to None: not known (not in the hub cache)."""

    FILE = "known missing"


def _checkpoint_file(reference: str, name: str) -> "Path | _Missing | None":
    """A file of a local (or node-cached s3://) checkpoint, or of a hub checkpoint already in
    the local hub cache."""
    if model_cache.is_remote(reference) or is_local_reference(reference):
        path = Path(local_checkpoint(reference)) / name
        return path if path.is_file() else _Missing.FILE
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(reference, name)
    if isinstance(found, str):
        return Path(found)
    return None if found is None else _Missing.FILE


class ImagePreparer:
    """Both halves for a model actor, from the processor the actor loaded with its model."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.resizer = Resize.from_processor(image_processor)
        self.height, self.width = self.resizer.height, self.resizer.width
        # On CUDA, stage the uint8 batch in page-locked memory: the copy to the GPU is then one
        # DMA queued behind the model's work, not a synchronous copy through a driver buffer.
        self.pin_memory = True

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        return self.resizer.resize(rgb)

    def to_device_pixel_values(self, images, device: str, dtype=None):
        """The processor's rescale and normalise, computed by torch on ``device`` (``images``: uint8 arrays,
        or one uint8 tensor, already on the device when it was decoded there): the uint8 batch
        crosses to the GPU (a quarter of the bytes) and is rescaled and normalised there, so the one
        CPU that feeds a GPU actor is not spent on float arithmetic. Same operations as the
        processor's, in float32 (it rescales in float64 first: the results differ by float32
        rounding, about 1e-7)."""
        import torch

        processor = self.image_processor
        if isinstance(images, torch.Tensor):  # decoded on the device already (blip_ops.jpeg_device)
            pixels = images.to(device).float()
        elif torch.device(device).type == "cuda" and self.pin_memory:
            from .overlap import to_device

            pixels = to_device(_pinned_copy(images, (len(images), 3, self.height, self.width)), device).float()
        else:
            batch = images if isinstance(images, np.ndarray) else np.stack(images)
            with warnings.catch_warnings():
                # A read-only view of Arrow memory: torch warns, but only reads it (.float() copies).
                warnings.filterwarnings("ignore", message=".*not writable.*")
                pixels = torch.from_numpy(batch).to(device).float()
        if processor.do_rescale:
            pixels = pixels * processor.rescale_factor
        if processor.do_normalize:
            mean = torch.as_tensor(processor.image_mean, dtype=torch.float32, device=device).reshape(-1, 1, 1)
            std = torch.as_tensor(processor.image_std, dtype=torch.float32, device=device).reshape(-1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels if dtype is None else pixels.to(dtype)


def _pinned_copy(images, shape: tuple[int, ...]):
    """``images`` (one array or a list of them) gathered into page-locked host memory, in one
    copy; torch's caching host allocator reuses the block from batch to batch."""
    import torch

    staging = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    if isinstance(images, np.ndarray):
        np.copyto(staging.numpy(), images.reshape(shape))
    else:
        np.stack(images, out=staging.numpy())
    return staging
