"""precision bf16-weights: the weights are bf16, no autocast runs, scores stay close to fp32, and
evidence still takes its gradients in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_ops.captioner import Blip2Captioner
from blip_ops.evidence import GradCam
from blip_ops.precision import autocast, resolve_precision, weight_dtype
from blip_ops.scorer import BlipScorer
from tests.blip_ops.test_overlap import TEXTS, _images


def test_bf16_weights_is_explicit_and_never_autocasts():
    assert resolve_precision("bf16-weights", "cpu") == "bf16-weights"
    assert resolve_precision("auto", "cpu") == "fp32"  # auto never picks it
    assert weight_dtype("bf16-weights") == torch.bfloat16 and weight_dtype("bf16") == torch.float32
    assert not isinstance(autocast("bf16-weights", "cpu"), torch.autocast)


@pytest.fixture(scope="module")
def scorers(tiny_itm):
    return (BlipScorer.from_pretrained(tiny_itm, device="cpu"),
            BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="bf16-weights"))


def test_scores_run_on_bf16_weights_and_stay_close_to_fp32(scorers):
    fp32, bf16 = scorers
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    pixels = [fp32.images.resize(image) for image in _images(len(TEXTS))]
    seen = set()
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
               for m in bf16.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    try:
        itc, itm, _ = bf16.score(pixels, TEXTS)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {torch.bfloat16}  # layer norms too: no autocast keeps anything in fp32
    assert itc.dtype == itm.dtype == np.float32
    itc32, itm32, _ = fp32.score(pixels, TEXTS)
    np.testing.assert_allclose(itc, itc32, atol=0.05)
    np.testing.assert_allclose(itm, itm32, atol=0.05)


def test_evidence_on_bf16_weights_takes_gradients_on_an_fp32_copy(scorers):
    fp32, bf16 = scorers
    explainer = GradCam(bf16.model, bf16.tokenizer)
    assert next(explainer.text_encoder.parameters()).dtype == torch.float32
    assert next(bf16.model.text_encoder.parameters()).dtype == torch.bfloat16  # the scoring weights stay
    pixels = [fp32.images.resize(image) for image in _images(3)]
    explained = bf16.score_explained(pixels, TEXTS[:3], lambda a, b: np.ones(len(a), dtype=bool), explainer)
    assert all(e.heat.dtype == np.float32 and np.isfinite(e.heat).all() and e.heat.any() for e in explained.evidence)


def test_captions_run_on_bf16_weights(tiny_caption):
    captioner = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=4, precision="bf16-weights")
    assert {p.dtype for p in captioner.model.parameters()} == {torch.bfloat16}
    pixels = [captioner.images.resize(image) for image in _images(3)]
    captions = captioner.caption(pixels)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
