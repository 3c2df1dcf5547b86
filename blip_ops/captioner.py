"""BLIP-2 captions with batched greedy decoding.

Every row in a batch gets the same prompt, so prompts never need padding and a batch
decodes exactly as its rows would one at a time. ``generate`` keeps the KV cache (its
default), so each new token costs one decoder step over one position, not the whole
sequence. Rows that finish early keep decoding pad tokens until the batch's longest
caption ends; that waste is bounded by ``max_new_tokens``.

As in the scorer, the model call takes the captioner's ``DeviceTurn`` and the host work around
it (staging pixels, decoding token ids to text) does not, so two concurrent calls overlap
(``blip_ops.overlap``). ``rows_for_memory`` picks a batch size from the card's free memory.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .checkpoints import CAPTION, inspect_checkpoint, load_model, load_processor, resolve_device
from .overlap import DeviceTurn, ToHost
from .precision import autocast, resolve_precision, weight_dtype
from .preprocess import ImagePreparer, check_resize_settings

CACHES = ("dynamic", "static")


class Blip2Captioner:
    def __init__(
        self,
        model,
        processor,
        device: str = "cpu",
        max_new_tokens: int = 30,
        prompt: str | None = None,
        precision: str = "auto",
        cache: str = "dynamic",
    ):
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        self.model = model
        self.processor = processor
        self.images = ImagePreparer(processor.image_processor)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt or None
        self._prompt_ids = self._encode_prompt() if self.prompt else None
        self.precision = resolve_precision(precision, device)
        # "static" preallocates the KV cache at prompt + max_new_tokens; on a GPU transformers
        # then compiles the decoding step (torch.compile, CUDA graphs). Same tokens, other cost.
        self._generate_options = {"cache_implementation": "static"} if cache == "static" else {}
        self.device_turn = DeviceTurn()
        self.tokenizer_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        reference: str,
        device: str = "auto",
        max_new_tokens: int = 30,
        prompt: str | None = None,
        precision: str = "auto",
        cache: str = "dynamic",
    ) -> "Blip2Captioner":
        from transformers import Blip2ForConditionalGeneration

        inspect_checkpoint(reference, CAPTION)
        device = resolve_device(device)
        # transformers 5.23 already selects SDPA attention for BLIP-2's vision model, Q-Former
        # and OPT (all declare _supports_sdpa); nothing to override.
        model = load_model(reference, Blip2ForConditionalGeneration, device, dtype=weight_dtype(precision))
        processor = load_processor(reference)
        check_resize_settings(reference, processor.image_processor)
        return cls(model, processor, device, max_new_tokens, prompt, precision, cache)

    def _encode_prompt(self) -> dict:
        # The processor expands the image placeholder tokens in front of the prompt.
        encoded = self.processor(
            images=[np.zeros((3, self.images.height, self.images.width), dtype=np.uint8)],
            text=[self.prompt],
            return_tensors="pt",
            images_kwargs={"input_data_format": "channels_first"},
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def rows_for_memory(self, cap: int) -> int | None:
        """Rows per call that fit this card's free memory now (``blip_ops.batch_memory``); None off CUDA."""
        if torch.device(self.device).type != "cuda":
            return None
        from .batch_memory import CaptionDims, caption_rows

        dims = CaptionDims.from_config(self.model.config)
        prompt = 0 if self._prompt_ids is None else self._prompt_ids["input_ids"].shape[1] - dims.query_tokens
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        return caption_rows(free, dims, max(0, prompt), self.max_new_tokens, self.precision, cap=cap)

    def _text_inputs(self, batch_size: int) -> dict:
        if self._prompt_ids is None:
            return {}
        return {name: ids.repeat(batch_size, 1).to(self.device) for name, ids in self._prompt_ids.items()}

    @torch.inference_mode()
    def caption(self, images) -> list[str]:
        """``images``: resized uint8 ``(3, h, w)`` arrays, or one ``(n, 3, h, w)`` array. Returns one stripped caption each."""
        if len(images) == 0:
            return []
        pixel_values = self.images.to_device_pixel_values(images, self.device, next(self.model.parameters()).dtype)
        # One autocast context around the whole generate call, so half-precision weight
        # copies are made once per batch, not once per decoding step.
        with self.device_turn, autocast(self.precision, self.device):
            generated = self.model.generate(
                pixel_values=pixel_values,
                **self._text_inputs(len(images)),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                **self._generate_options,
            )
            tokens = ToHost.start(generated)
        (ids,) = tokens.numpy()
        with self.tokenizer_lock:
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [text.strip() for text in texts]
