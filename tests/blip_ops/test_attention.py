"""The fused (SDPA) vision attention is BLIP's attention, and is used only where the scorer says."""

import numpy as np
import pytest
import torch

from blip_ops import attention
from blip_ops.attention import sdpa_vision_attention
from blip_ops.scorer import BlipScorer


@pytest.fixture(scope="module")
def itm_model(tiny_itm):
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(tiny_itm).eval()


def _pixels(model, batch=3):
    size = model.config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _sdpa_calls(monkeypatch) -> list:
    calls = []
    real = attention.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "scaled_dot_product_attention", counting)
    return calls


def test_fused_attention_equals_eager_up_to_rounding(itm_model):
    pixels = _pixels(itm_model)
    with torch.inference_mode():
        eager = itm_model.vision_model(pixel_values=pixels).last_hidden_state
        with sdpa_vision_attention(itm_model.vision_model) as replaced:
            fused = itm_model.vision_model(pixel_values=pixels).last_hidden_state
    assert replaced == itm_model.config.vision_config.num_hidden_layers
    assert eager.abs().max() > 0.1  # a real signal, not zeros agreeing with zeros
    np.testing.assert_allclose(fused.numpy(), eager.numpy(), rtol=0, atol=1e-5)


def test_the_model_gets_its_own_attention_back_even_after_an_error(itm_model, monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    with pytest.raises(RuntimeError, match="inside"):
        with sdpa_vision_attention(itm_model.vision_model):
            raise RuntimeError("inside")
    with torch.inference_mode():
        itm_model.vision_model(pixel_values=_pixels(itm_model))
    assert calls == []
    assert not any("forward" in vars(m) for m in itm_model.modules())


@pytest.mark.parametrize("precision, fused", [("fp32", False), ("bf16", True)])
def test_scorer_fuses_only_in_half_precision(tiny_itm, monkeypatch, precision, fused):
    """fp32 stays transformers' eager attention: those are the scores the fidelity tests pin."""
    scorer = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision=precision)
    calls = _sdpa_calls(monkeypatch)
    size = scorer.images.height
    images = [np.full((3, size, size), 40 * k, dtype=np.uint8) for k in range(2)]
    scorer.score(images, ["a cat", "a dog"])
    layers = scorer.model.config.vision_config.num_hidden_layers
    assert scorer.fused_attention is fused
    assert len(calls) == (layers if fused else 0)
    if fused:
        assert {shape[0] for shape in calls} == {2}  # one fused call per layer for the whole batch


def test_nested_and_overlapping_blocks_keep_the_fused_attention_until_the_last_exits(itm_model, monkeypatch):
    """Two threads scoring with one model: the first to finish must not switch the other's
    remaining layers back to eager attention."""
    calls = _sdpa_calls(monkeypatch)
    vision = itm_model.vision_model
    layers = itm_model.config.vision_config.num_hidden_layers
    with torch.inference_mode():
        with sdpa_vision_attention(vision):
            with sdpa_vision_attention(vision):
                pass  # the inner holder leaves first
            vision(pixel_values=_pixels(itm_model))
            assert len(calls) == layers
        vision(pixel_values=_pixels(itm_model))
    assert len(calls) == layers
    assert not any("forward" in vars(m) for m in itm_model.modules())
