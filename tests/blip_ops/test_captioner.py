"""Fidelity: batched greedy captions equal Blip2ForConditionalGeneration.generate on each single image."""

import numpy as np
import pytest
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
