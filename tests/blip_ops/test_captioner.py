"""Fidelity: batched greedy captions equal Blip2ForConditionalGeneration.generate on each single image."""

import numpy as np
import pytest
import torch
from PIL import Image

from blip_ops.captioner import Blip2Captioner
from blip_ops.images import decode_rgb
from tests.conftest import image_bytes
from tests.reference import caption_reference

MAX_NEW_TOKENS = 8


def _images(n=5):
    rng = np.random.RandomState(1)
    return [
        image_bytes(Image.fromarray((rng.rand(18 + 7 * i, 26 + 3 * i, 3) * 255).astype(np.uint8)), "PNG")
        for i in range(n)
    ]


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_batched_captions_equal_single_image_reference(tiny_caption, prompt):
    reference = caption_reference(tiny_caption, MAX_NEW_TOKENS, prompt)
    captioner = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=MAX_NEW_TOKENS, prompt=prompt)
    images = _images()
    captions = captioner.caption([captioner.images.resize(decode_rgb(d)) for d in images])
    expected = [reference(d) for d in images]
    assert captions == expected
    assert len(set(expected)) > 1, "tiny model must caption images differently for this test to mean anything"


def test_empty_batch(tiny_caption):
    captioner = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=2)
    assert captioner.caption([]) == []


def test_explicit_fp32_captions_equal_auto_on_cpu(tiny_caption):
    images = _images(3)
    auto = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=MAX_NEW_TOKENS)
    fp32 = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=MAX_NEW_TOKENS, precision="fp32")
    assert auto.precision == fp32.precision == "fp32"
    resized = [auto.images.resize(decode_rgb(d)) for d in images]
    assert auto.caption(resized) == fp32.caption(resized)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_autocast_captions_run_in_half(tiny_caption, precision, dtype):
    captioner = Blip2Captioner.from_pretrained(
        tiny_caption, device="cpu", max_new_tokens=MAX_NEW_TOKENS, precision=precision
    )
    assert captioner.precision == precision
    seen = set()
    handle = captioner.model.language_model.lm_head.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    resized = [captioner.images.resize(decode_rgb(d)) for d in _images(3)]
    try:
        captions = captioner.caption(resized)
    finally:
        handle.remove()
    assert seen == {dtype}
    fp32 = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=MAX_NEW_TOKENS, precision="fp32")
    # Greedy decoding may part ways after a near-tie in half precision; most captions must agree.
    assert sum(a == b for a, b in zip(captions, fp32.caption(resized))) >= 2


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_static_cache_captions_equal_the_reference(tiny_caption, prompt):
    """The static KV cache (what torch.compile needs on a GPU) changes the cost, never the tokens."""
    from transformers import StaticCache

    reference = caption_reference(tiny_caption, MAX_NEW_TOKENS, prompt)
    captioner = Blip2Captioner.from_pretrained(
        tiny_caption, device="cpu", max_new_tokens=MAX_NEW_TOKENS, prompt=prompt, cache="static"
    )
    caches = set()
    handle = captioner.model.language_model.register_forward_pre_hook(
        lambda _m, _args, kwargs: caches.add(type(kwargs.get("past_key_values"))), with_kwargs=True
    )
    images = _images()
    try:
        captions = captioner.caption([captioner.images.resize(decode_rgb(d)) for d in images])
    finally:
        handle.remove()
    assert caches == {StaticCache}
    assert captions == [reference(d) for d in images]


def test_unknown_cache_is_refused(tiny_caption):
    with pytest.raises(ValueError, match="cache must be one of dynamic, static"):
        Blip2Captioner.from_pretrained(tiny_caption, device="cpu", cache="paged")
