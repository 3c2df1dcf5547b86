"""Stage contracts without Ray: same rows, same order, plus the stage's columns."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from blip_ops.samples import draw_shape
from pipelines import schema as S
from pipelines.dataflow.stages import ScoreStage, decode_batch, finalize_batch, flag_batch

ROOT = Path(__file__).resolve().parents[3]


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


def test_a_null_or_blank_image_uri_is_an_image_error_of_its_own(tiny_itm, tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(draw_shape("red", "circle"))
    batch = pa.table({"id": [1, 2, 3, 4], "text": ["a", "b", "c", "d"], "uri": [None, "", "   ", str(good)]})
    out = decode_batch(
        batch, text_column="text", image_column="uri", from_uri=True, score_model=tiny_itm, caption_model=None
    )
    assert out.column(S.IMAGE_ERROR).to_pylist() == ["missing image URI"] * 3 + [None]
    assert out.column(S.PIXELS_SCORE).is_valid().to_pylist() == [False, False, False, True]
    assert out.column("uri").to_pylist() == batch.column("uri").to_pylist()  # URIs are kept, bytes are not


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


def test_images_over_the_byte_limit_are_image_errors(tiny_itm, tmp_path):
    small, large = draw_shape("red", "circle"), draw_shape("blue", "square") + b"\0" * 5000
    (tmp_path / "small.png").write_bytes(small)
    (tmp_path / "large.png").write_bytes(large)
    limit = len(small) + 10
    by_bytes = decode_batch(
        pa.table({"text": ["a", "b"], "image": pa.array([small, large], pa.binary())}),
        text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None,
        max_image_bytes=limit,
    )
    by_uri = decode_batch(
        pa.table({"text": ["a", "b"], "uri": [str(tmp_path / "small.png"), str(tmp_path / "large.png")]}),
        text_column="text", image_column="uri", from_uri=True, score_model=tiny_itm, caption_model=None,
        max_image_bytes=limit,
    )
    for out in (by_bytes, by_uri):
        assert out.column(S.IMAGE_ERROR).to_pylist() == [
            None, f"image of {len(large)} bytes exceeds the limit of {limit} bytes"
        ]
        assert out.column(S.PIXELS_SCORE).is_valid().to_pylist() == [True, False]


def test_invisible_text_is_a_text_error(tiny_itm):
    out = decode_batch(
        pa.table({"text": ["\u200b\u200b", "\u200bok"], "image": pa.array([draw_shape("red", "circle")] * 2, pa.binary())}),
        text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None,
    )
    errors = out.column(S.TEXT_ERROR).to_pylist()
    assert errors[0].startswith("text of invisible characters only") and errors[1] is None


def test_a_huge_image_uri_is_refused_in_bounded_memory(tiny_itm, tmp_path):
    # A 4 GB sparse file (no disk used), decoded in a fresh process at the default limit: the
    # peak resident size must not grow by anything near the file's size.
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(4 * 1024**3)
    script = (
        "import resource, sys\n"
        "import pyarrow as pa\n"
        "from pipelines.dataflow.stages import decode_batch\n"
        "from pipelines.config import DEFAULT_MAX_IMAGE_BYTES\n"
        "batch = pa.table({'text': ['t'], 'uri': [sys.argv[1]]})\n"
        "decode_batch(batch.slice(0, 0), text_column='text', image_column='uri', from_uri=True, score_model=sys.argv[2], caption_model=None)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = decode_batch(batch, text_column='text', image_column='uri', from_uri=True, score_model=sys.argv[2],\n"
        "                   caption_model=None, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES)\n"
        "print(out.column('__image_error')[0].as_py())\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(huge), tiny_itm], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    error, grown_mb = result.stdout.strip().splitlines()[-2:]
    assert error == f"image of {4 * 1024**3} bytes exceeds the limit of {50 * 1024**2} bytes"
    assert int(grown_mb) < 16  # never read: not 4 GB, and not even the 50 MiB a read up to the limit would cost


class _WordEncoder:
    """Embeds a text by which of a few words it holds: agreement is then predictable."""

    words = ["sofa", "couch", "shoe", "red"]

    def encode(self, texts):
        vectors = np.array([[float(w in t.lower()) for w in self.words] + [0.01] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_agreement_flags_rows_below_the_threshold_and_skips_unusable_texts():
    from pipelines.dataflow.stages import add_agreement

    batch = pa.table({
        "text": ["red sofa", "red sofa", "shoe", "sofa", "red sofa"],
        "status": ["ok", "ok", "text_error", "ok", "image_error"],
        "caption": ["a photo of a red sofa", "a shoe", "a shoe", None, None],
        "flagged": [False, False, True, False, True],
        "flag_reasons": pa.array([[], [], ["text_error"], [], ["image_error"]], pa.list_(pa.string())),
    })
    out = add_agreement(batch, _WordEncoder(), "text", threshold=0.5)
    values = out.column(S.CAPTION_AGREEMENT).to_pylist()
    assert values[0] == pytest.approx(1.0, abs=1e-3) and values[1] < 0.5 and values[2:] == [None, None, None]
    assert out.column("flag_reasons").to_pylist() == [
        [], ["caption_disagrees"], ["text_error"], [], ["image_error"]
    ]
    assert out.column("flagged").to_pylist() == [False, True, True, False, True]
    unflagged = add_agreement(batch, _WordEncoder(), "text", threshold=None)
    assert unflagged.column("flag_reasons").to_pylist() == batch.column("flag_reasons").to_pylist()
    assert out.column_names == batch.column_names + [S.CAPTION_AGREEMENT]


def test_unsupported_languages_are_flagged_but_keep_their_scores():
    batch = _scored(itc=[0.5, 0.5, 0.5, None], itm=[0.9, 0.9, 0.1, None], text_error=[None, None, None, "missing text"])
    batch = batch.append_column(S.TEXT_LANGUAGE, pa.array(["de", None, "en", "de"], pa.string()))
    out = flag_batch(batch, itm_threshold=0.5, itc_threshold=0.2, text_languages=("en",))
    assert out.column("flag_reasons").to_pylist() == [
        ["text_language_unsupported"], [], ["itm_below_threshold"], ["text_error"]  # undetermined: not flagged
    ]
    assert out.column("status").to_pylist() == ["ok", "ok", "ok", "text_error"]
    assert out.column("itm_score").to_pylist()[0] == pytest.approx(0.9)
    assert flag_batch(batch, itm_threshold=0.5, itc_threshold=0.2, text_languages=("en", "de")).column(
        "flag_reasons").to_pylist()[0] == []
    off = flag_batch(batch, itm_threshold=0.5, itc_threshold=0.2, text_languages=None)
    assert off.column("flag_reasons").to_pylist()[0] == []


def test_decode_detects_languages_of_usable_texts_only(tiny_itm):
    texts = ["Wasserdichte Wanderschuhe für Herren aus braunem Leder", "Red leather sofa for the living room", "SKU-4432-XL", None]
    batch = pa.table({"text": texts, "image": pa.array([draw_shape("red", "circle")] * 4, pa.binary())})
    kwargs = dict(text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None)
    assert decode_batch(batch, detect_language=True, **kwargs).column(S.TEXT_LANGUAGE).to_pylist() == ["de", "en", None, None]
    assert decode_batch(batch, **kwargs).column(S.TEXT_LANGUAGE).null_count == 4


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
