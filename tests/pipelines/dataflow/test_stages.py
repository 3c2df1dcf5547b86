"""Stage contracts without Ray: same rows, same order, plus the stage's columns."""

import numpy as np
import pyarrow as pa
import pytest

from blip_ops.samples import draw_shape
from pipelines import schema as S
from pipelines.dataflow.stages import ScoreStage, decode_batch, finalize_batch, flag_batch


def _scored(itc, itm, image_error=None, text_error=None):
    return pa.table(
        {
            S.IMAGE_ERROR: pa.array(image_error or [None] * len(itc), pa.string()),
            S.TEXT_ERROR: pa.array(text_error or [None] * len(itc), pa.string()),
            "itc_score": pa.array(itc, pa.float32()),
            "itm_score": pa.array(itm, pa.float32()),
        }
    )


@pytest.mark.parametrize(
    "itm_t, itc_t, expected",
    [
        (0.5, 0.2, [[], [S.REASON_ITM], [S.REASON_ITC], [S.REASON_ITM, S.REASON_ITC]]),
        (None, 0.2, [[], [], [S.REASON_ITC], [S.REASON_ITC]]),
        (0.5, None, [[], [S.REASON_ITM], [], [S.REASON_ITM]]),
        (None, None, [[], [], [], []]),
    ],
)
def test_flag_rules_per_threshold(itm_t, itc_t, expected):
    batch = _scored(itc=[0.3, 0.3, 0.1, 0.1], itm=[0.9, 0.2, 0.9, 0.2])
    out = flag_batch(batch, itm_threshold=itm_t, itc_threshold=itc_t)
    assert out.column("flag_reasons").to_pylist() == expected
    assert out.column("flagged").to_pylist() == [bool(r) for r in expected]
    assert out.column("status").to_pylist() == ["ok"] * 4
    assert out.column("error").to_pylist() == [None] * 4


def test_threshold_is_strictly_below():
    out = flag_batch(_scored(itc=[0.25], itm=[0.5]), itm_threshold=0.5, itc_threshold=0.25)
    assert out.column("flagged").to_pylist() == [False]


def test_unchecked_rows_fail_closed_even_with_thresholds_off():
    batch = _scored(
        itc=[None, None, None],
        itm=[None, None, None],
        image_error=["empty image bytes", None, "missing image"],
        text_error=[None, "missing text", "empty or blank text"],
    )
    out = flag_batch(batch, itm_threshold=None, itc_threshold=None)
    assert out.column("status").to_pylist() == ["image_error", "text_error", "image_error"]
    assert out.column("flagged").to_pylist() == [True, True, True]
    assert out.column("flag_reasons").to_pylist() == [["image_error"], ["text_error"], ["image_error", "text_error"]]
    assert out.column("error").to_pylist() == ["empty image bytes", "missing text", "missing image; empty or blank text"]


def test_decode_keeps_rows_and_order_and_drops_image_bytes(tiny_itm, tiny_caption):
    batch = pa.table(
        {
            "id": [3, 1, 2, 2],
            "text": ["a red circle", None, " ", "ok"],
            "image": pa.array([draw_shape("red", "circle"), draw_shape("blue", "square"), b"junk", None], pa.binary()),
        }
    )
    out = decode_batch(
        batch, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=tiny_caption
    )
    assert out.column("id").to_pylist() == [3, 1, 2, 2]
    assert "image" not in out.column_names
    assert out.column(S.IMAGE_ERROR).to_pylist()[:2] == [None, None]
    assert out.column(S.IMAGE_ERROR).to_pylist()[3] == "missing image"
    assert out.column(S.TEXT_ERROR).to_pylist() == [None, "missing text", "empty or blank text", None]
    assert [len(p) if p else None for p in out.column(S.PIXELS_SCORE).to_pylist()] == [3 * 32 * 32, 3 * 32 * 32, None, None]
    assert [len(p) if p else None for p in out.column(S.PIXELS_CAPTION).to_pylist()] == [3 * 24 * 24, 3 * 24 * 24, None, None]


def test_score_stage_scores_only_checkable_rows(tiny_itm):
    batch = pa.table(
        {
            "text": ["a red circle", None, "a blue square " * 40],
            "image": pa.array([draw_shape("red", "circle"), draw_shape("blue", "square"), draw_shape("red", "square")]),
        }
    )
    decoded = decode_batch(
        batch, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None
    )
    out = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")(decoded)
    assert out.column("itc_score").null_count == 1 and out.column("itc_score").to_pylist()[1] is None
    assert out.column("text_truncated").to_pylist() == [False, False, True]
    assert S.PIXELS_SCORE not in out.column_names


def test_score_stage_handles_a_batch_with_nothing_to_score(tiny_itm):
    batch = pa.table({"text": [None], "image": pa.array([None], pa.binary())})
    decoded = decode_batch(
        batch, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None
    )
    out = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")(decoded)
    assert out.column("itm_score").to_pylist() == [None]


def test_finalize_types_every_column_even_all_null():
    batch = flag_batch(
        _scored(itc=[None], itm=[None], image_error=["missing image"]), itm_threshold=0.5, itc_threshold=0.2
    ).append_column("text_truncated", pa.array([False]))
    batch = batch.append_column("id", pa.array(["x"]))
    out = finalize_batch(batch, passthrough=["id"], run_id="r1", itm_model="m", caption_model=None)
    assert out.column_names == ["id"] + S.OUTPUT_COLUMNS
    assert out.schema.field("caption").type == pa.string()
    assert out.schema.field("caption_model").type == pa.string()
    assert out.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert out.schema.field("itc_score").type == pa.float32()


def test_truncation_is_reported_for_rows_with_a_broken_image(tiny_itm):
    batch = pa.table({"text": ["a red circle " * 40, "short"], "image": pa.array([b"junk", b"junk"], pa.binary())})
    decoded = decode_batch(
        batch, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None
    )
    out = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")(decoded)
    assert out.column("text_truncated").to_pylist() == [True, False]
    assert out.column("itc_score").to_pylist() == [None, None]


def test_jpeg_draft_decode_moves_pixels_only_slightly(tiny_itm):
    """--jpeg-draft: a large JPEG decodes at reduced scale; resized pixels stay close, not equal."""
    import numpy as np
    from PIL import Image

    from tests.conftest import image_bytes

    y, x = np.mgrid[0:600, 0:800]
    photo = np.stack([x * 255 // 800, y * 255 // 600, (x * y) % 256], axis=-1).astype(np.uint8)
    batch = pa.table({"text": ["a photo"], "image": [image_bytes(Image.fromarray(photo), "JPEG", quality=90)]})
    kwargs = dict(text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None)
    full, draft = (
        np.frombuffer(decode_batch(batch, jpeg_draft=on, **kwargs).column(S.PIXELS_SCORE)[0].as_py(), np.uint8).astype(int)
        for on in (False, True)
    )
    difference = np.abs(full - draft)
    assert difference.max() > 0  # it is a different decode, so it is opt-in
    assert difference.mean() < 4


def _on_a_small_card(monkeypatch, model_call, fits: int) -> list:
    """Make ``model_call`` (a bound method) raise CUDA out-of-memory above ``fits`` rows."""
    import torch

    sizes, real = [], model_call

    def limited(images, *args):
        sizes.append(len(images))
        if len(images) > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(images, *args)

    monkeypatch.setattr(model_call.__self__, model_call.__name__, limited)
    return sizes


def _shapes_batch(n):
    colours, shapes = ["red", "blue", "green"], ["circle", "square", "triangle"]
    return pa.table({
        "text": [f"a {colours[i % 3]} {shapes[i // 3 % 3]}" for i in range(n)],
        "image": pa.array([draw_shape(colours[i % 3], shapes[i // 3 % 3]) for i in range(n)]),
    })


def test_model_stages_halve_their_batch_on_gpu_out_of_memory(tiny_itm, tiny_caption, monkeypatch):
    """A batch too big for the card is scored and captioned in parts: same rows, same values."""
    from pipelines.dataflow.stages import CaptionStage

    decoded = decode_batch(
        _shapes_batch(7), text_column="text", image_column="image", from_uri=False, score_model=tiny_itm,
        caption_model=tiny_caption,
    )
    score = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")
    caption = CaptionStage(model=tiny_caption, device="cpu", max_new_tokens=4, prompt=None, policy="all")
    expected = caption(score(decoded))

    score_sizes = _on_a_small_card(monkeypatch, score.scorer.score, fits=3)
    caption_sizes = _on_a_small_card(monkeypatch, caption.captioner.caption, fits=2)
    got = caption(score(decoded))
    # Scores agree to float rounding (texts pad to each part's longest), as in the scorer's
    # batch-invariance test; everything else is equal.
    for name in ("itc_score", "itm_score"):
        np.testing.assert_allclose(got.column(name).to_numpy(), expected.column(name).to_numpy(), rtol=0, atol=1e-5)
    assert got.drop_columns(["itc_score", "itm_score"]).equals(expected.drop_columns(["itc_score", "itm_score"]))
    assert score_sizes == [7, 3, 3, 1] and caption_sizes == [7, 3, 1, 1, 1, 1, 1, 1, 1]
    assert (score.parts.rows_per_call, caption.parts.rows_per_call) == (3, 1)


def test_decode_records_the_content_hashes_of_bytes_and_of_bytes_read_from_uris(tiny_itm, tmp_path):
    import hashlib

    from blip_ops.samples import draw_shape

    image = draw_shape("red", "circle")
    (tmp_path / "a.jpg").write_bytes(image)
    as_bytes = decode_batch(pa.table({"text": ["t", None], "image": pa.array([image, None], pa.binary())}),
                            text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None)
    from_uri = decode_batch(pa.table({"text": ["t", "t"], "uri": [str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")]}),
                            text_column="text", image_column="uri", from_uri=True, score_model=tiny_itm, caption_model=None)
    digest = hashlib.sha256(image).hexdigest()
    assert as_bytes.column("image_sha256").to_pylist() == [digest, None]
    assert as_bytes.column("text_sha256").to_pylist() == [hashlib.sha256(b"t").hexdigest(), None]
    assert from_uri.column("image_sha256").to_pylist() == [digest, None]  # the bytes read; an unreadable URI has none
