"""Every way a map is computed equals the LAVIS port (tests/reference.py), not only at layer 0.

On CUDA ``auto`` precision is bf16, so there every map comes from ``GradCam.explain``, the full
fp32 text-encoder pass; in fp32 the scorer serves maps from its own pass instead (recorded, or from
the kept layer input). ``GradCam(reuse_scoring_pass=False)`` forces the full pass in fp32, so it is
compared with the port on the CPU here, and so are bf16 autocast and bf16 weights, on the image
embeddings their own vision pass made. Production explains layer 6 of 12; the 2-layer tiny
checkpoint allows layer 0 only, so layers 1 and 2 of a 4-layer one are compared on all three paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_ops.evidence import GradCam, Wanted
from blip_ops.images import decode_rgb
from blip_ops.scorer import BlipScorer
from tests.blip_ops.test_evidence import PATH_TEXTS, _close, _path_images, _Paths
from tests.reference import gradcam_reference


def _every(values, *_):
    return np.ones(len(values), dtype=bool)


# Rows 1, 3, 5 and 6: row 1's text is the batch's longest, so the full pass's chunk of rows 5 and 6
# is cut to a narrower width than the batch's; rows 0, 2, 4 and 7 are not explained at all.
SOME = np.array([False, True, False, True, False, True, True, False])


def _some(values, *_):
    return SOME[: len(values)].copy()


POLICIES = {"every row": Wanted(_every, _every), "some rows": Wanted(_some, _some)}


def _scorer(checkpoint: str, precision: str, monkeypatch, chunk_workers: int = 1) -> BlipScorer:
    scorer = BlipScorer.from_pretrained(
        checkpoint, device="cpu", max_text_tokens=35, precision=precision, chunk_workers=chunk_workers
    )
    monkeypatch.setattr(scorer, "chunk_rows", 4)  # two chunks of four: the maps are computed chunk by chunk
    return scorer


def _explained(scorer, gradcam, wanted, monkeypatch):
    """``score_explained`` over PATH_TEXTS, the image embeddings its vision pass made (batch order),
    and which path computed the maps (``_Paths.calls``)."""
    images = [scorer.images.resize(decode_rgb(d)) for d in _path_images()]
    seen = []  # (pixels, embeddings) per vision pass: one per chunk, in any order with chunk workers
    handle = scorer.model.vision_model.register_forward_hook(
        lambda _m, _a, kwargs, out: seen.append((kwargs["pixel_values"], out.last_hidden_state)), with_kwargs=True
    )
    paths = _Paths(gradcam, monkeypatch)
    try:
        result = scorer.score_explained(images, PATH_TEXTS, wanted, gradcam)
    finally:
        handle.remove()
    # Each chunk put back at its rows, found by its pixels (the batch's images all differ).
    with torch.inference_mode():
        pixels = scorer.images.to_device_pixel_values(images, "cpu", next(scorer.model.parameters()).dtype)
    at = {next(s for s in range(len(pixels)) if torch.equal(pixels[s : s + len(p)], p)): e for p, e in seen}
    embeds = torch.cat([at[start] for start in sorted(at)])
    assert len(embeds) == len(images)
    # The scores are the plain scorer's, bit for bit, whichever path the maps took.
    itc, itm, _ = scorer.score(images, PATH_TEXTS)
    np.testing.assert_array_equal(result.itc, itc)
    np.testing.assert_array_equal(result.itm, itm)
    assert [e is not None for e in result.evidence] == list(wanted(itc, itm))
    return result.evidence, embeds, paths.calls


def _assert_the_port(evidence, reference, layer, embeds=None):
    spreads = []
    for row, (data, text, item) in enumerate(zip(_path_images(), PATH_TEXTS, evidence)):
        if item is None:
            continue
        maps, _ = reference(data, text, None if embeds is None else embeds[row : row + 1])
        assert item.layer == layer and item.heat.dtype == np.float32
        _close(item.heat, maps[1])
        spreads.append(maps[1])
    # The maps differ from row to row (and patch to patch), or the equality proves little.
    assert all(np.ptp(m) > 0 for m in spreads) and np.ptp(np.stack(spreads), axis=0).max() > 0
    return spreads


def test_the_scoring_pass_is_reused_only_in_fp32_unless_told_not_to(tiny_itm):
    # The switch score_explained takes its paths by (BlipScorer.reuses_layers), every branch of it.
    fp32 = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="fp32")
    bf16 = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="bf16")
    weights = BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="bf16-weights")
    assert fp32.reuses_layers(GradCam(fp32.model, fp32.tokenizer))
    assert not fp32.reuses_layers(GradCam(fp32.model, fp32.tokenizer, reuse_scoring_pass=False))
    assert not bf16.reuses_layers(GradCam(bf16.model, bf16.tokenizer))  # autocast: the GPU's default
    assert not weights.reuses_layers(GradCam(weights.model, weights.tokenizer))  # evidence on an fp32 copy


@pytest.mark.parametrize("policy", POLICIES)
def test_the_full_pass_in_fp32_equals_the_lavis_port(tiny_itm, monkeypatch, policy):
    scorer = _scorer(tiny_itm, "fp32", monkeypatch)
    gradcam = GradCam(scorer.model, scorer.tokenizer, reuse_scoring_pass=False)
    # Every row wanted from ITC alone would make the scoring pass record its graph: not when told not to.
    evidence, _, calls = _explained(scorer, gradcam, POLICIES[policy], monkeypatch)
    assert calls == {"every row": {"recorded": [], "from": [], "full": [4, 4]},
                     "some rows": {"recorded": [], "from": [], "full": [4]}}[policy]
    _assert_the_port(evidence, gradcam_reference(tiny_itm, gradcam.layer), gradcam.layer)


@pytest.mark.parametrize("chunk_workers", [1, 2])
def test_bf16_autocast_evidence_is_the_fp32_lavis_port_on_its_own_image_embeddings(tiny_itm, monkeypatch, chunk_workers):
    # The GPU's default: the vision pass in bf16 autocast, the map in fp32 on the fp32 weights. With
    # chunk workers (CPU only) the chunks' maps run on threads that take the caller's autocast.
    scorer = _scorer(tiny_itm, "bf16", monkeypatch, chunk_workers)
    gradcam = GradCam(scorer.model, scorer.tokenizer)
    evidence, embeds, calls = _explained(scorer, gradcam, POLICIES["every row"], monkeypatch)
    assert calls == {"recorded": [], "from": [], "full": [4, 4]}
    reference = gradcam_reference(tiny_itm, gradcam.layer)
    maps = _assert_the_port(evidence, reference, gradcam.layer, embeds)
    # The embeddings matter: on the port's own fp32 vision pass the maps are not these.
    own = [reference(data, text)[0][1] for data, text in zip(_path_images(), PATH_TEXTS)]
    assert not all(np.allclose(m, o, rtol=1e-3, atol=1e-3 * float(np.abs(o).max())) for m, o in zip(maps, own))


def test_bf16_weights_evidence_is_the_fp32_lavis_port_on_the_bf16_weights(tiny_itm, monkeypatch):
    # The weights the map is taken on are the scoring ones as stored (bf16), cast up: GradCam's fp32 copy.
    scorer = _scorer(tiny_itm, "bf16-weights", monkeypatch)
    gradcam = GradCam(scorer.model, scorer.tokenizer)
    evidence, embeds, calls = _explained(scorer, gradcam, POLICIES["some rows"], monkeypatch)
    assert calls == {"recorded": [], "from": [], "full": [4]}
    assert embeds.dtype == torch.bfloat16
    maps = _assert_the_port(evidence, gradcam_reference(tiny_itm, gradcam.layer, weights=torch.bfloat16), gradcam.layer, embeds)
    # The rounding matters: on the checkpoint's fp32 weights the port's maps are not these.
    unrounded = gradcam_reference(tiny_itm, gradcam.layer)
    own = [unrounded(_path_images()[row], PATH_TEXTS[row], embeds[row : row + 1])[0][1] for row in np.flatnonzero(SOME)]
    assert not all(np.allclose(m, o, rtol=1e-3, atol=1e-3 * float(np.abs(o).max())) for m, o in zip(maps, own))


# --- Above layer 0: a 4-layer text encoder, layers 1 and 2 ------------------------------------

PATHS = {
    # wanted, reuse_scoring_pass, the maps' path per chunk
    "kept input": (_every, True, {"recorded": [], "from": [4, 4], "full": []}),  # ITM's rule only: known too late to record
    "recorded": (Wanted(_every, _every), True, {"recorded": [4, 4], "from": [], "full": []}),
    "full pass": (Wanted(_every, _every), False, {"recorded": [], "from": [], "full": [4, 4]}),
}


@pytest.fixture(scope="module")
def deep_reference(tiny_itm_4_layers):
    return {layer: gradcam_reference(tiny_itm_4_layers, layer) for layer in (1, 2)}


def test_the_deep_checkpoint_explains_each_layer_and_row_differently(tiny_itm_4_layers, deep_reference):
    # Otherwise a map from the wrong layer, or of another row, could pass the comparisons below. And
    # at unit gain: at transformers' default init (std 0.02) the maps are about 1e-13, rounding noise.
    references = [gradcam_reference(tiny_itm_4_layers, 0), deep_reference[1], deep_reference[2]]
    pairs = list(zip(_path_images(), PATH_TEXTS))[:4]
    maps = np.stack([[reference(data, text)[0][1] for data, text in pairs] for reference in references])
    assert np.abs(maps).max(axis=-1).min() > 1e-6  # (layer, row): every map well above rounding noise

    def differ(a, b):
        return not np.allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.abs(b).max()))

    for first in range(3):
        for second in range(first + 1, 3):
            assert all(differ(maps[first, row], maps[second, row]) for row in range(4)), ("layers", first, second)
            assert all(differ(maps[layer, first], maps[layer, second]) for layer in range(3)), ("rows", first, second)


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_maps_above_layer_0_equal_the_lavis_port_on_every_path(tiny_itm_4_layers, deep_reference, monkeypatch, path, layer):
    wanted, reuse, expected = PATHS[path]
    scorer = _scorer(tiny_itm_4_layers, "fp32", monkeypatch)
    gradcam = GradCam(scorer.model, scorer.tokenizer, layer=layer, reuse_scoring_pass=reuse)
    evidence, _, calls = _explained(scorer, gradcam, wanted, monkeypatch)
    assert calls == expected
    _assert_the_port(evidence, deep_reference[layer], layer)
