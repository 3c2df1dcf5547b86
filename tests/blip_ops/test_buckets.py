"""Bucketed shapes: the model sees few shapes, and every row's scores are the unpadded ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_ops import buckets
from blip_ops.scorer import BlipScorer
from tests.blip_ops.test_overlap import TEXTS, _images


@pytest.mark.parametrize("rows, bucket", [(0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (64, 64), (65, 128), (255, 256)])
def test_batch_buckets_are_powers_of_two(rows, bucket):
    assert buckets.batch_bucket(rows) == bucket


@pytest.mark.parametrize("tokens, bucket", [(1, 8), (8, 8), (9, 16), (30, 32), (33, 35), (35, 35)])
def test_text_buckets_are_multiples_of_8_capped_at_the_truncation(tokens, bucket):
    assert buckets.text_bucket(tokens, max_tokens=35) == bucket


def test_padding_repeats_the_last_row_and_masks_tokens():
    padded = buckets.pad_rows(torch.tensor([[1, 2], [3, 4], [5, 6]]), 4)
    assert padded.tolist() == [[1, 2], [3, 4], [5, 6], [5, 6]]
    ids, mask = buckets.pad_tokens(torch.tensor([[101, 7, 102]]), torch.tensor([[1, 1, 1]]), 8, pad_id=0)
    assert ids.tolist() == [[101, 7, 102, 0, 0, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def scorers(tiny_itm):
    plain = BlipScorer.from_pretrained(tiny_itm, device="cpu")
    bucketed = BlipScorer(plain.model, _Processor(plain), device="cpu", shape_buckets=True)
    return plain, bucketed


class _Processor:
    """The plain scorer's processor parts, so both scorers share one model."""

    def __init__(self, scorer):
        self.tokenizer = scorer.tokenizer
        self.image_processor = scorer.images.image_processor


@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_bucketed_scores_equal_the_unpadded_ones(scorers, rows):
    plain, bucketed = scorers
    pixels = [plain.images.resize(image) for image in _images(rows)]
    texts = TEXTS[:rows]
    shapes = []
    hook = plain.model.text_encoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        itc, itm, truncated = bucketed.score(pixels, texts)
    finally:
        hook.remove()
    expected = plain.score(pixels, texts)
    assert {shape[0] for shape in shapes} == {buckets.batch_bucket(rows)}
    assert all(shape[1] % buckets.TEXT_STEP == 0 or shape[1] == bucketed.max_text_tokens for shape in shapes)
    assert len(itc) == len(itm) == rows
    # fp32 on the CPU: equal up to float rounding (another GEMM shape may sum in another order).
    np.testing.assert_allclose(itc, expected[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(itm, expected[1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(truncated, expected[2])


def test_compile_is_ignored_on_the_cpu(scorers, caplog):
    plain, _ = scorers
    compiled = BlipScorer(plain.model, _Processor(plain), device="cpu", compile=True)
    assert not compiled.compiled and not compiled.shape_buckets
    assert compiled.vision_model is plain.model.vision_model
    assert "CUDA only" in caplog.text
