"""Evidence in the score stage, without Ray: which rows get it, that it is the scorer's own, and
that ``none`` runs no backward pass."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from blip_ops.evidence import GradCam
from blip_ops.images import decode_rgb
from blip_ops.samples import draw_shape
from blip_ops.scorer import BlipScorer
from pipelines import schema as S
from pipelines.dataflow.stages import ScoreStage, decode_batch, score_reasons

TEXTS = ["a red circle", None, "a blue square with stripes", "photo of a dog", "a green triangle", "cup"]
SHAPES = [("red", "circle"), ("blue", "square"), ("blue", "square"), ("red", "square"), ("green", "triangle"), ("yellow", "circle")]


def _decoded(tiny_itm):
    images = [draw_shape(color, shape) for color, shape in SHAPES]
    images[5] = b"not an image"
    batch = pa.table({"text": TEXTS, "image": pa.array(images, pa.binary())})
    return decode_batch(batch, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None)


_STAGES = {}


def _stage(tiny_itm, evidence, layer=None):
    # One per setting for the module: a stage loads its model.
    key = (tiny_itm, evidence, layer)
    if key not in _STAGES:
        _STAGES[key] = ScoreStage(
            model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text", evidence=evidence, evidence_layer=layer
        )
    return _STAGES[key]


SCORED = [0, 2, 3, 4]  # row 1 has no text, row 5 no image


def test_evidence_none_runs_no_backward_pass_and_adds_a_null_column(tiny_itm, monkeypatch):
    stage = _stage(tiny_itm, "none")
    assert stage.gradcam is None
    calls = {"grad": 0, "text": 0}
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    handle = stage.scorer.model.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    try:
        out = stage(_decoded(tiny_itm), itm_threshold=1.0, itc_threshold=1.0)  # every row below: all would be explained
    finally:
        handle.remove()
    assert calls == {"grad": 0, "text": 2}  # the ITM and ITC text passes, nothing more
    assert out.column("evidence").type == S.EVIDENCE_TYPE and out.column("evidence").null_count == len(TEXTS)
    assert out.column(S.EVIDENCE_SECONDS).to_pylist() == [0.0] * len(TEXTS)
    # And the same stage with evidence on does take the gradient (so the count above can fail).
    explaining = _stage(tiny_itm, "all")
    explaining(_decoded(tiny_itm))
    assert calls["grad"] == 1


@pytest.mark.parametrize("itm_threshold, itc_threshold", [(0.5, 0.2), (None, 0.3), (0.7, None), (None, None)])
def test_flagged_explains_exactly_the_rows_below_a_threshold(tiny_itm, itm_threshold, itc_threshold):
    stage = _stage(tiny_itm, "flagged")
    out = stage(_decoded(tiny_itm), itm_threshold=itm_threshold, itc_threshold=itc_threshold)
    itc, itm = out.column("itc_score").to_pylist(), out.column("itm_score").to_pylist()
    expected = [i in SCORED and bool(score_reasons(itc[i], itm[i], itm_threshold, itc_threshold)) for i in range(len(TEXTS))]
    evidence = out.column("evidence").to_pylist()
    assert [e is not None for e in evidence] == expected
    seconds = out.column(S.EVIDENCE_SECONDS).to_numpy()
    assert ((seconds > 0) == np.array(expected)).all()


def test_flagged_rows_differ_between_thresholds(tiny_itm):
    # The parametrised test above is only as good as its thresholds: some rows must be in, some out.
    out = _stage(tiny_itm, "none")(_decoded(tiny_itm))
    itc, itm = out.column("itc_score").to_pylist(), out.column("itm_score").to_pylist()
    picked = [[bool(score_reasons(itc[i], itm[i], 0.5, 0.2)) for i in SCORED], [bool(score_reasons(itc[i], itm[i], None, 0.3)) for i in SCORED]]
    assert any(any(p) and not all(p) for p in picked), (itc, itm)


def test_all_explains_every_scored_row_with_the_scorers_own_evidence(tiny_itm):
    decoded = _decoded(tiny_itm)
    out = _stage(tiny_itm, "all")(decoded)  # the default layer of a 2-layer encoder: 0
    evidence = out.column("evidence").to_pylist()
    assert [i for i, e in enumerate(evidence) if e is not None] == SCORED
    scorer = BlipScorer.from_pretrained(tiny_itm, device="cpu")
    gradcam = GradCam(scorer.model, scorer.tokenizer, layer=0)
    for i in SCORED:
        pixels = scorer.images.resize(decode_rgb(draw_shape(*SHAPES[i])))
        (alone,) = scorer.score_explained([pixels], [TEXTS[i]], lambda a, b: np.ones(1, bool), gradcam).evidence
        row = evidence[i]
        assert (row["rows"], row["cols"], row["layer"]) == (4, 4, 0) and len(row["heat"]) == 16
        np.testing.assert_allclose(row["heat"], alone.heat, rtol=1e-5, atol=1e-5 * np.abs(alone.heat).max())
        assert [w["word"] for w in row["words"]] == [w for w, _ in alone.words]
        assert 0 < len(row["words"]) <= 5


def test_an_unusable_layer_fails_the_stage_at_construction(tiny_itm):
    with pytest.raises(ValueError, match="last one"):
        _stage(tiny_itm, "flagged", layer=1)


def test_the_wanted_rows_flagged_by_itc_are_known_before_itm(tiny_itm):
    # What the scorer may record a chunk's graph for: rows the rule flags whatever their ITM.
    itc = np.array([0.1, 0.3, 0.25, 0.2499], dtype=np.float32)
    wanted = _stage(tiny_itm, "flagged")._wanted(0.5, 0.25)
    known = wanted.from_itc(itc)
    assert known.tolist() == [True, False, False, True]
    for itm in (np.zeros(4, dtype=np.float32), np.ones(4, dtype=np.float32)):
        assert wanted(itc, itm)[known].all()
    assert wanted(itc, np.ones(4, dtype=np.float32)).tolist() == known.tolist()
    assert _stage(tiny_itm, "flagged")._wanted(0.5, None).from_itc is None  # ITM flags only: known after ITM
    every = _stage(tiny_itm, "all")._wanted(0.5, 0.25)
    assert every.from_itc(itc).all() and every(itc, np.ones(4)).all()
