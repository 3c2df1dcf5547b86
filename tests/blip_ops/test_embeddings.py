"""--embeddings at the scorer: the projections equal Hugging Face's, and ITC is their dot product."""

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from blip_ops.images import decode_rgb
from blip_ops.scorer import BlipScorer
from pipelines import vectors
from tests.conftest import image_bytes
from tests.reference import embedding_reference

TEXTS = ["a red circle", "a blue square on a white background with stripes", "photo", "a small dog",
         "a green triangle and a yellow cup on a table", "two cats", "a shoe", "a lamp", "a chair", "a cup"]


def _images():
    rng = np.random.RandomState(3)
    return [image_bytes(Image.fromarray((rng.rand(20 + 7 * i, 30 + 3 * i, 3) * 255).astype(np.uint8)), "PNG")
            for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def scored(tiny_itm):
    scorer = BlipScorer.from_pretrained(tiny_itm, device="cpu", max_text_tokens=35)
    images = _images()
    itc, itm, truncated, features = scorer.score_with_features([scorer.images.resize(decode_rgb(d)) for d in images], TEXTS)
    return scorer, images, itc, features


def test_projections_equal_the_hugging_face_forward(scored, tiny_itm):
    scorer, images, itc, features = scored
    dim = scorer.model.config.image_text_hidden_size
    assert features.shape == (len(TEXTS), 2 * dim) and features.dtype == np.float32
    reference = embedding_reference(tiny_itm)
    for row, (data, text) in enumerate(zip(images, TEXTS)):
        image_feat, text_feat, ref_itc = reference(data, text)
        np.testing.assert_allclose(features[row, :dim], image_feat, atol=1e-4)
        np.testing.assert_allclose(features[row, dim:], text_feat, atol=1e-4)
        assert itc[row] == pytest.approx(ref_itc, abs=1e-4)
    # The rows differ, or the comparison proves little.
    assert np.ptp(features[:, 0]) > 0.05


def test_itc_is_the_dot_product_of_the_float16_columns(scored):
    scorer, _, itc, features = scored
    dim = scorer.model.config.image_text_hidden_size
    image = vectors.fixed_array(features[:, :dim])
    text = vectors.fixed_array(features[:, dim:])
    assert image.type == pa.list_(pa.float16(), dim)
    a, _ = vectors.to_numpy(image)
    b, _ = vectors.to_numpy(text)
    dots = (a.astype(np.float32) * b.astype(np.float32)).sum(axis=1)
    # float16 keeps 11 significant bits: each of the unit vectors moves by at most 2^-11 relative per value.
    np.testing.assert_allclose(dots, itc, atol=2 * 2.0 ** -11 + 1e-6)
    np.testing.assert_allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1.0, atol=1e-3)


def test_explained_scoring_keeps_the_same_projections(scored, tiny_itm):
    from blip_ops.evidence import GradCam, Wanted

    scorer, images, itc, features = scored
    gradcam = GradCam(scorer.model, scorer.tokenizer)
    result = scorer.score_explained([scorer.images.resize(decode_rgb(d)) for d in images], TEXTS,
                                    Wanted(lambda c, m: np.ones(len(c), bool)), gradcam)
    np.testing.assert_allclose(result.features, features, atol=1e-6)


def test_bytes_round_trip_and_nulls():
    matrix = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float16)
    column = vectors.fixed_array(matrix, np.array([True, False, True, True]))
    assert column.null_count == 1
    back = vectors.from_bytes(vectors.to_bytes(column), 8)
    assert back.equals(column)
    spread = vectors.spread(matrix[:2], np.array([1, 3]), 5, 8)
    assert spread.is_valid().to_pylist() == [False, True, False, True, False]
    with pytest.raises(ValueError):
        vectors.from_bytes(pa.array([b"\x00" * 6]), 8)
