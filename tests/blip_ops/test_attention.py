"""The fused (SDPA) vision attention is BLIP's attention up to rounding, and eager is there when asked."""

import numpy as np
import pytest
import torch

from blip_ops import attention
from blip_ops.attention import sdpa_vision_attention
from blip_ops.checkpoints import load_processor
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


@pytest.mark.parametrize(
    "precision, vision_attention, fused",
    [("fp32", "fused", True), ("fp32", "eager", False), ("bf16", "fused", True), ("bf16", "eager", False)],
)
def test_scorer_fuses_unless_told_eager(tiny_itm, monkeypatch, precision, vision_attention, fused):
    scorer = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision=precision, vision_attention=vision_attention)
    calls = _sdpa_calls(monkeypatch)
    size = scorer.images.height
    images = [np.full((3, size, size), 40 * k, dtype=np.uint8) for k in range(2)]
    scorer.score(images, ["a cat", "a dog"])
    layers = scorer.model.config.vision_config.num_hidden_layers
    assert scorer.fused_attention is fused
    assert len(calls) == (layers if fused else 0)
    if fused:
        assert {shape[0] for shape in calls} == {2}  # one fused call per layer for the whole batch


def test_eager_scores_are_the_models_own_and_fused_ones_are_within_rounding(tiny_itm):
    """eager (on torch's own kernels) is BlipForImageTextRetrieval's forward bit for bit; fused moves
    fp32 scores by rounding only."""
    from transformers import BlipForImageTextRetrieval

    eager = BlipScorer.from_pretrained(tiny_itm, device="cpu", vision_attention="eager", cpu_kernels="torch")
    fused = BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="torch")
    size = eager.images.height
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    texts = ["a red shirt", "two dogs on grass", "a blue car at night"]
    itc_e, itm_e, _ = eager.score(images, texts)
    itc_f, itm_f, _ = fused.score(images, texts)
    model = BlipForImageTextRetrieval.from_pretrained(tiny_itm).eval()
    pixels = eager.images.to_device_pixel_values(images, "cpu", torch.float32)
    tokens = eager.tokenize(texts)
    with torch.inference_mode():
        itm_hf = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                       use_itm_head=True).itm_score.softmax(dim=-1)[:, 1].numpy()
    np.testing.assert_array_equal(itm_e, itm_hf)
    np.testing.assert_allclose(itm_f, itm_e, rtol=0, atol=1e-6)
    np.testing.assert_allclose(itc_f, itc_e, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="vision_attention"):
        BlipScorer(eager.model, load_processor(tiny_itm), vision_attention="flash")


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
