"""Grad-CAM evidence equals LAVIS's algorithm ported onto the transformers model (tests/reference.py)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from blip_ops.evidence import GradCam, Wanted, check_layer, default_layer, top_words
from blip_ops.images import decode_rgb
from blip_ops.scorer import BlipScorer
from tests.conftest import image_bytes
from tests.reference import gradcam_reference

TEXTS = [
    "a red sneakers, shoe",
    "a blue square on a white background with stripes and dots",
    "photo",
    "a green triangle and a yellow cup on a table",
    "running shoes!",
]


def _images():
    rng = np.random.RandomState(3)
    return [image_bytes(Image.fromarray((rng.rand(24 + 7 * i, 36 + 5 * i, 3) * 255).astype(np.uint8))) for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def scorer(tiny_itm):
    return BlipScorer.from_pretrained(tiny_itm, device="cpu", max_text_tokens=35, precision="fp32")


@pytest.fixture(scope="module")
def gradcam(scorer):
    return GradCam(scorer.model, scorer.tokenizer)


def _pixels(scorer):
    return [scorer.images.resize(decode_rgb(d)) for d in _images()]


def _explain(scorer, gradcam, images, texts):
    result = scorer.score_explained(images, texts, lambda itc, itm: np.ones(len(itc), dtype=bool), gradcam)
    return result.evidence


def _close(got, want, rtol=1e-5):
    # Relative to the map's own scale: a patch near zero is compared at the map's precision.
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_default_layer_is_lavis_for_12_layers_else_the_middle():
    assert default_layer(12) == 6 and default_layer(2) == 0 and default_layer(24) == 11 and default_layer(6) == 2
    assert check_layer(None, 2) == 0 and check_layer(0, 2) == 0 and check_layer(10, 12) == 10
    for layer in (1, 2, -1):
        with pytest.raises(ValueError, match="layers 0..1"):
            check_layer(layer, 2)


def test_the_last_layer_explains_nothing(scorer, tiny_itm):
    # Why check_layer refuses it: the reference port itself gives all-zero word maps there.
    maps, _ = gradcam_reference(tiny_itm, 1)(_images()[0], TEXTS[0])
    assert not maps[1:].any() and maps[0].any()


def test_heat_equals_the_lavis_port_on_each_single_pair(scorer, gradcam, tiny_itm):
    layer = gradcam.layer
    reference = gradcam_reference(tiny_itm, layer)
    evidence = _explain(scorer, gradcam, _pixels(scorer), TEXTS)
    spreads = []
    for data, text, item in zip(_images(), TEXTS, evidence):
        maps, tokens = reference(data, text)
        assert (item.rows, item.cols, item.layer) == (4, 4, layer) and item.heat.dtype == np.float32
        _close(item.heat, maps[1])
        spreads.append(np.ptp(maps[1]))
        # Each word weighs the total of its tokens' maps (WordPiece pieces merged back).
        word_tokens = tokens[:len(tokens) - 1]  # [SEP] last
        for word, weight in item.words:
            pieces = [i for i, t in enumerate(word_tokens) if t == word or word.startswith(t)]
            assert pieces, (word, word_tokens)
        assert [w for _, w in item.words] == sorted((w for _, w in item.words), reverse=True)
    # The maps must differ from row to row and patch to patch, or the equality proves little.
    assert min(spreads) > 0


def test_words_merge_wordpieces_and_weigh_each_word_by_its_tokens_maps(scorer, gradcam, tiny_itm):
    reference = gradcam_reference(tiny_itm, gradcam.layer)
    data, text = _images()[0], TEXTS[0]  # "a red sneakers, shoe": sneaker ##s, and a comma
    maps, tokens = reference(data, text)
    assert tokens == ["a", "red", "sneaker", "##s", ",", "shoe", "[SEP]"]
    totals = maps[2:].sum(axis=1)  # per token after [CLS]
    expected = {"a": totals[0], "red": totals[1], "sneakers": totals[2] + totals[3], "shoe": totals[5]}
    (item,) = _explain(scorer, gradcam, [scorer.images.resize(decode_rgb(data))], [text])
    assert {w for w, _ in item.words} == set(expected)  # no comma, no [SEP]
    for word, weight in item.words:
        assert weight == pytest.approx(expected[word], rel=1e-5, abs=1e-5 * float(max(abs(v) for v in expected.values())))


def test_special_tokens_and_padding_contribute_nothing(scorer, gradcam, tiny_itm):
    reference = gradcam_reference(tiny_itm, gradcam.layer)
    images = _pixels(scorer)
    for data, text, item in zip(_images(), TEXTS, _explain(scorer, gradcam, images, TEXTS)):
        maps, tokens = reference(data, text)
        words = maps[2:-1]  # every token after [CLS] but the final [SEP]
        _close(item.heat, words.mean(axis=0))
        # [CLS] and [SEP] have maps of their own: had they been averaged in, the heat would differ.
        with_specials = np.concatenate([maps[:1], maps[2:]]).mean(axis=0)
        assert not np.allclose(item.heat, with_specials, rtol=1e-3, atol=0)
    # Padding: "photo" padded to the batch's longest text gives the heat it gives alone.
    alone = _explain(scorer, gradcam, [images[2]], [TEXTS[2]])[0]
    padded = _explain(scorer, gradcam, images, TEXTS)[2]
    _close(padded.heat, alone.heat)


def test_evidence_does_not_depend_on_batch_size_order_or_other_rows(scorer, gradcam):
    images = _pixels(scorer)
    full = _explain(scorer, gradcam, images, TEXTS)
    order = [4, 2, 0, 3, 1]
    shuffled = _explain(scorer, gradcam, [images[i] for i in order], [TEXTS[i] for i in order])
    for position, i in enumerate(order):
        _close(shuffled[position].heat, full[i].heat)
        assert [w for w, _ in shuffled[position].words] == [w for w, _ in full[i].words]
    # Rows not wanted are not computed, and do not change the rows that are.
    picked = scorer.score_explained(images, TEXTS, lambda itc, itm: np.arange(len(itc)) % 2 == 1, gradcam)
    assert [e is None for e in picked.evidence] == [True, False, True, False, True]
    for i in (1, 3):
        _close(picked.evidence[i].heat, full[i].heat)


def test_scores_are_unchanged_and_the_evidence_explains_the_same_logit(scorer, gradcam):
    images = _pixels(scorer)
    itc, itm, truncated = scorer.score(images, TEXTS)
    explained = scorer.score_explained(images, TEXTS, lambda a, b: np.ones(len(a), dtype=bool), gradcam)
    np.testing.assert_array_equal(explained.itc, itc)
    np.testing.assert_array_equal(explained.itm, itm)
    assert explained.evidence_s > 0


def test_half_precision_scoring_still_takes_gradients_in_fp32(tiny_itm):
    bf16 = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="bf16")
    explainer = GradCam(bf16.model, bf16.tokenizer)
    seen = []
    # The context (not the probabilities: autocast runs softmax in fp32 anyway) shows the arithmetic.
    handle = explainer.block.crossattention.self.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
    every = lambda values, *_: np.ones(len(values), dtype=bool)  # noqa: E731
    try:
        # Every row wanted from ITC alone: in fp32 the scoring pass would record its graph, not here.
        evidence = bf16.score_explained(_pixels(bf16), TEXTS, Wanted(every, every), explainer).evidence
    finally:
        handle.remove()
    assert seen == [torch.bfloat16, torch.float32]  # the scoring pass, then the explained one
    assert all(e.heat.dtype == np.float32 and np.isfinite(e.heat).all() and e.heat.any() for e in evidence)


def test_top_words_skips_punctuation_and_special_tokens_and_keeps_five():
    tokens = ["a", "red", "sneak", "##er", "##s", ",", "[UNK]", "b", "c", "d", "e"]
    weights = np.array([0.1, 0.5, 0.2, 0.2, 0.1, 9.0, 8.0, 0.3, 0.05, 0.3, 0.0])
    words = top_words(tokens, weights, skip={"[UNK]"})
    assert [w for w, _ in words] == ["red", "sneakers", "b", "d", "a"]
    assert words[1][1] == pytest.approx(0.5)


# Eight rows in chunks of four: chunk 0 = rows 0-3, chunk 1 = rows 4-7. The longest text is row 1's,
# so rows explained on their own (5 and 6) are cut to a narrower width than the batch's.
PATH_TEXTS = TEXTS + ["a cat", "two dogs on grass", "shoe"]


def _path_images():
    rng = np.random.RandomState(5)
    return [image_bytes(Image.fromarray((rng.rand(20 + 3 * i, 30 + 4 * i, 3) * 255).astype(np.uint8))) for i in range(len(PATH_TEXTS))]


class _Paths:
    """Counts which way each map was computed: recorded in the ITM pass, from its kept layer input, or the old full pass."""

    def __init__(self, gradcam, monkeypatch):
        self.calls = {"recorded": [], "from": [], "full": []}
        for name, method in (("recorded", "explain_recorded"), ("from", "explain_from"), ("full", "explain")):
            real = getattr(gradcam, method)

            def counting(*args, _real=real, _name=name, **kwargs):
                out = _real(*args, **kwargs)
                self.calls[_name].append(len(out))
                return out

            monkeypatch.setattr(gradcam, method, counting)


@pytest.mark.parametrize("policy", ["all", "itc and itm", "itm only", "no itc rule"])
def test_maps_from_the_scoring_pass_equal_the_full_encoder_reference(scorer, gradcam, tiny_itm, monkeypatch, policy):
    monkeypatch.setattr(scorer, "chunk_rows", 4)
    images = [scorer.images.resize(decode_rgb(d)) for d in _path_images()]
    itc, itm, _ = scorer.score(images, PATH_TEXTS)
    # Row-wise rules on the scores themselves, as ScoreStage's thresholds are.
    by_itc = np.isin(itc, itc[[0, 1, 2, 5]]) if policy == "itc and itm" else np.zeros(len(itc), dtype=bool)
    by_itm = np.isin(itm, itm[[3, 6]]) if policy in ("itc and itm", "itm only", "no itc rule") else np.zeros(len(itm), dtype=bool)

    def from_itc(values):
        return np.ones(len(values), dtype=bool) if policy == "all" else np.isin(values, itc[by_itc])

    def rule(values, itm_values):
        return from_itc(values) | np.isin(itm_values, itm[by_itm])

    wanted = Wanted(rule, None if policy == "no itc rule" else from_itc)
    paths = _Paths(gradcam, monkeypatch)
    result = scorer.score_explained(images, PATH_TEXTS, wanted, gradcam)
    # The scores are the plain scorer's, bit for bit, whichever pass recorded a graph.
    np.testing.assert_array_equal(result.itc, itc)
    np.testing.assert_array_equal(result.itm, itm)
    expected = rule(itc, itm)
    assert [e is not None for e in result.evidence] == list(expected)
    # Which path each chunk took: all -> both recorded; 3 of chunk 0's 4 rows flagged by ITC ->
    # recorded (row 3, flagged by ITM only, is explained from that recording), 1 of chunk 1's ->
    # rows 5 and 6 from the kept layer input; ITM-only flags are known too late to record.
    assert paths.calls == {
        "all": {"recorded": [4, 4], "from": [], "full": []},
        "itc and itm": {"recorded": [4], "from": [2], "full": []},
        "itm only": {"recorded": [], "from": [2], "full": []},
        "no itc rule": {"recorded": [], "from": [2], "full": []},
    }[policy]
    reference = gradcam_reference(tiny_itm, gradcam.layer)
    for data, text, item in zip(_path_images(), PATH_TEXTS, result.evidence):
        if item is not None:
            maps, _ = reference(data, text)
            _close(item.heat, maps[1])
    assert result.evidence_s > 0


def test_wanted_from_itc_alone_records_nothing_below_the_share(scorer, gradcam, monkeypatch):
    # One ITC-flagged row in four is below RECORD_SHARE: no chunk records, and the row is still explained.
    monkeypatch.setattr(scorer, "chunk_rows", 4)
    images = [scorer.images.resize(decode_rgb(d)) for d in _path_images()]
    itc, _, _ = scorer.score(images, PATH_TEXTS)
    flagged = lambda values: np.isin(values, itc[[2]])  # noqa: E731
    paths = _Paths(gradcam, monkeypatch)
    result = scorer.score_explained(images, PATH_TEXTS, Wanted(lambda a, b: flagged(a), flagged), gradcam)
    assert paths.calls == {"recorded": [], "from": [1], "full": []}
    assert [i for i, e in enumerate(result.evidence) if e is not None] == [2]


def test_two_threads_explaining_at_once_each_get_their_own_rows_maps(scorer, gradcam):
    # --overlap on: two batches in one actor. The hooks that keep and record a pass sit on the shared
    # model, so a thread must never see the other's pass: one records, the other keeps layer inputs.
    images = _pixels(scorer)
    every = lambda values, *_: np.ones(len(values), dtype=bool)  # noqa: E731
    calls = [
        (images, TEXTS, Wanted(every, every)),
        (images[::-1], TEXTS[::-1], every),
    ]
    alone = [scorer.score_explained(*call, gradcam).evidence for call in calls]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda call: scorer.score_explained(*call, gradcam).evidence, calls * 5))
    for i, evidence in enumerate(together):
        for got, want in zip(evidence, alone[i % 2]):
            _close(got.heat, want.heat)


def test_a_chunk_with_no_padding_beside_one_with_padding_keeps_its_maps(scorer, gradcam, tiny_itm, monkeypatch):
    # Transformers passes no attention mask for a chunk whose texts are all the batch's longest (nothing
    # to mask) and a 4D one for a chunk with padding: joined, the first must mask nothing.
    texts = ["a red cat on a white table"] * 4 + ["a cat", "shoe", "two dogs", "a red cup on a table"]
    monkeypatch.setattr(scorer, "chunk_rows", 4)
    mask = scorer.tokenize(texts).attention_mask
    assert bool(mask[:4].all()) and not bool(mask[4:].all())  # chunk 0 unpadded, chunk 1 padded
    data = _path_images()
    images = [scorer.images.resize(decode_rgb(d)) for d in data]
    paths = _Paths(gradcam, monkeypatch)
    every = lambda itc, itm: np.ones(len(itc), dtype=bool)  # noqa: E731  (no from_itc: the kept-input path)
    result = scorer.score_explained(images, texts, every, gradcam)
    assert paths.calls == {"recorded": [], "from": [4, 4], "full": []}
    reference = gradcam_reference(tiny_itm, gradcam.layer)
    for image, text, item in zip(data, texts, result.evidence):
        maps, _ = reference(image, text)
        _close(item.heat, maps[1])
