"""Splitting the checkpoint's own image processor into a CPU half and a model half.

The CPU half (``resize``) turns an RGB array into uint8 pixels at model resolution, which
is cheap to ship between workers (a quarter of float32). The model half (``to_pixel_values``)
rescales and normalises. Both call the checkpoint's processor, so together they compute
exactly what the processor computes in one call.
"""

from __future__ import annotations

import warnings

import numpy as np

from .checkpoints import load_image_processor


class ImagePreparer:
    def __init__(self, image_processor):
        self.image_processor = image_processor
        size = image_processor.size
        self.height, self.width = int(size["height"]), int(size["width"])

    @classmethod
    def from_pretrained(cls, reference: str) -> "ImagePreparer":
        return cls(load_image_processor(reference))

    @property
    def num_bytes(self) -> int:
        return 3 * self.height * self.width

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB to ``(3, height, width)`` uint8 at model resolution."""
        out = self.image_processor(
            images=[rgb],
            do_convert_rgb=False,
            do_rescale=False,
            do_normalize=False,
            input_data_format="channels_last",
            return_tensors=None,
        )["pixel_values"][0]
        return np.ascontiguousarray(out, dtype=np.uint8)

    def from_bytes(self, buffer: bytes) -> np.ndarray:
        return np.frombuffer(buffer, dtype=np.uint8).reshape(3, self.height, self.width)

    def to_device_pixel_values(self, images, device: str, dtype=None):
        """``to_pixel_values`` computed by torch on ``device``: the uint8 batch crosses to the GPU
        (a quarter of the bytes) and is rescaled and normalised there, so the one CPU that feeds a
        GPU actor is not spent on float arithmetic. Same operations as the processor's, in float32
        (it rescales in float64 first: the results differ by float32 rounding, about 1e-7)."""
        import torch

        processor = self.image_processor
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

    def to_pixel_values(self, images: list[np.ndarray]):
        """Resized uint8 ``(3, h, w)`` arrays to the normalised float tensor the model takes."""
        return self.image_processor(
            images=images,
            do_convert_rgb=False,
            do_resize=False,
            input_data_format="channels_first",
            return_tensors="pt",
        )["pixel_values"]
