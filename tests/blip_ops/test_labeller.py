"""Fidelity and definitions of the zero-shot labels (blip_ops.labels) against single-pair references."""

import numpy as np
import pytest
import torch
from PIL import Image

import blip_ops.labels as L
from blip_ops.images import decode_rgb
from blip_ops.labels import Labeller, _OnceForAll
from blip_ops.scorer import BlipScorer
from tests.conftest import image_bytes
from tests.reference import itm_reference, labels_reference

TEMPLATE = "a picture of {}"
NAMES = ["dog", "cat", "car", "house", "tree", "shoe", "phone", "chair", "cup", "red circle"]
POLICIES = [("weapon", ["a photo of a gun", "a knife"]), ("tobacco", ["a photo of a cigarette", "smoke"])]
TOP_K = 3
# Per image: its declared name's index (None: none or unknown). Some outside any top_k, by construction below.
DECLARED = [None, 0, 5, 9, 3, 7]


def _images(count=len(DECLARED)):
    rng = np.random.RandomState(1)
    return [image_bytes(Image.fromarray((rng.rand(24 + 7 * i, 30 + 3 * i, 3) * 255).astype(np.uint8)), "PNG")
            for i in range(count)]


@pytest.fixture(scope="module")
def scorer(tiny_itm):
    # eager attention, torch kernels: the scorer's own fidelity tests cover the others' few 1e-7
    return BlipScorer.from_pretrained(tiny_itm, device="cpu", vision_attention="eager", cpu_kernels="torch")


def _labelled(scorer, labeller, images, declared):
    pixels = [scorer.images.resize(decode_rgb(d)) for d in images]
    _, _, _, embeds = scorer.score_keeping_embeds(pixels, ["a photo"] * len(pixels))
    return labeller.label(embeds, declared)


def test_every_itc_and_itm_equals_the_single_pair_reference(scorer, tiny_itm):
    labeller = Labeller(scorer, NAMES, [TEMPLATE.format(n) for n in NAMES], TOP_K, POLICIES)
    reference = labels_reference(tiny_itm, TEMPLATE, NAMES, TOP_K, POLICIES)
    images = _images()
    results = _labelled(scorer, labeller, images, DECLARED)
    outside = 0
    for data, declared, got in zip(images, DECLARED, results):
        want = reference(data, declared)
        categories = {item["name"]: (item["itc"], item["itm"]) for item in got.labels if item["kind"] == "category"}
        assert set(categories) == set(want["candidates"])
        for name, (itc, itm) in categories.items():
            assert itc == pytest.approx(want["candidates"][name][0], abs=1e-5)
            assert itm == pytest.approx(want["candidates"][name][1], abs=1e-5)
        policies = {item["name"]: (item["itc"], item["itm"]) for item in got.labels if item["kind"] == "policy"}
        assert set(policies) == {"weapon", "tobacco"}
        for name, (itc, itm) in policies.items():
            assert itc == pytest.approx(want["policies"][name][0], abs=1e-5)
            assert itm == pytest.approx(want["policies"][name][1], abs=1e-5)
        assert got.predicted == want["predicted"]
        assert got.rank == want["rank"]
        assert (got.score is None) == (want["score"] is None)
        if declared is not None:
            assert got.score == pytest.approx(want["score"], abs=1e-5)
            outside += want["rank"] > TOP_K
        itms = [item["itm"] for item in got.labels]
        assert itms == sorted(itms, reverse=True)
    assert outside >= 1, "no declared name fell outside the short list: the test proves less than it says"
    # The values must spread, or equality with the reference proves little.
    spread = [item["itm"] for r in results for item in r.labels]
    assert np.ptp(spread) > 0.05


def test_a_taxonomy_larger_than_one_prompt_batch(scorer, tiny_itm, monkeypatch):
    """Prompts embedded over several text-encoder calls (PROMPT_BATCH) give every name's cosine."""
    names = [f"{a} {b}" for a in ("red", "blue", "green", "black", "white") for b in ("dog", "cat", "car", "cup")]
    monkeypatch.setattr(L, "PROMPT_BATCH", 3)
    labeller = Labeller(scorer, names, [TEMPLATE.format(n) for n in names], 2, [])
    assert len(labeller.category_feats) == len(names)
    pair = itm_reference(tiny_itm)
    data = _images(1)[0]
    result = _labelled(scorer, labeller, [data], [len(names) - 1])[0]
    cosines = np.array([pair(data, TEMPLATE.format(n))[0] for n in names], dtype=np.float64)
    assert result.rank == 1 + int((cosines > cosines[-1]).sum())
    top = sorted(range(len(names)), key=lambda i: (-cosines[i], i))[:2]
    assert {item["name"] for item in result.labels} == {names[i] for i in top} | {names[-1]}
    for item in result.labels:
        assert item["itc"] == pytest.approx(cosines[names.index(item["name"])], abs=1e-5)


def test_ties_keep_name_order_and_prediction_prefers_higher_itc(scorer):
    labeller = Labeller(scorer, ["a", "b", "c", "d"], ["a", "b", "c", "d"], 2, [])
    itc = np.array([0.1, 0.3, 0.3, 0.3], dtype=np.float32)
    assert labeller._candidates(itc, None) == [1, 2]  # equal cosines: the names' order
    assert labeller._candidates(itc, 0) == [1, 2, 0]  # the declared name joins the short list
    assert labeller._candidates(itc, 3) == [1, 2, 3]
    # Equal ITM: the higher cosine wins; equal both: the short list's order.
    row = labeller._row(np.array([0.1, 0.3, 0.2, 0.3], np.float32), np.zeros(0, np.float32), [1, 2, 0],
                        np.array([0.5, 0.9, 0.9], np.float32), 0)
    assert row.predicted == "c" and row.score == pytest.approx(0.9) and row.rank == 4
    row = labeller._row(np.array([0.3, 0.3, 0.3, 0.3], np.float32), np.zeros(0, np.float32), [0, 1],
                        np.array([0.7, 0.7], np.float32), 1)
    assert row.predicted == "a" and row.rank == 1  # a tie is not "above": rank 1 for all four


def test_image_projections_are_computed_once_per_row_with_the_same_values():
    inner = torch.nn.Linear(4, 3)
    calls = []
    inner.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    once = _OnceForAll(inner)
    x = torch.randn(1, 5, 4)
    expanded = once(x.expand(6, -1, -1))
    assert calls == [1] and expanded.shape == (6, 5, 3)
    assert torch.equal(expanded[4], inner(x)[0])
    plain = torch.randn(6, 5, 4)
    assert torch.equal(once(plain), inner(plain))  # a real batch goes through whole


def test_an_itc_gate_runs_policy_itm_only_where_its_prompts_reach_it(scorer):
    """Gated: the same values where the gate lets a policy through, itm None elsewhere (never flagged)."""
    prompts = [TEMPLATE.format(n) for n in NAMES]
    images = _images()
    plain = _labelled(scorer, Labeller(scorer, NAMES, prompts, TOP_K, POLICIES), images, DECLARED)
    weapon_itc = sorted(next(i["itc"] for i in r.labels if i["name"] == "weapon") for r in plain)
    gate = weapon_itc[len(weapon_itc) // 2]  # half the rows reach it
    gated = _labelled(scorer, Labeller(scorer, NAMES, prompts, TOP_K, POLICIES, [gate, 1.0]), images, DECLARED)
    let_through = 0
    for before, after in zip(plain, gated):
        old = {i["name"]: i for i in before.labels}
        new = {i["name"]: i for i in after.labels}
        assert set(old) == set(new) and after.predicted == before.predicted and after.rank == before.rank
        for name, item in new.items():
            assert item["itc"] == pytest.approx(old[name]["itc"], abs=1e-6)
            if name == "tobacco" or (name == "weapon" and item["itc"] < gate):
                assert item["itm"] is None
            else:
                assert item["itm"] == pytest.approx(old[name]["itm"], abs=1e-6)
                let_through += name == "weapon"
        assert after.labels[-1]["itm"] is None  # gated-out policies sort last
    assert 0 < let_through < len(images)


def test_packed_prompts_equal_one_call_per_row(scorer):
    """A row's prompts packed into one sequence (the default) give each pair's own ITM."""
    prompts = [TEMPLATE.format(n) for n in NAMES]
    packed = Labeller(scorer, NAMES, prompts, TOP_K, POLICIES)
    assert packed.packed  # the tiny checkpoint's text encoder is eager: the packed path is the one tested above
    apart = Labeller(scorer, NAMES, prompts, TOP_K, POLICIES, packed=False)
    images = _images()
    for a, b in zip(_labelled(scorer, packed, images, DECLARED), _labelled(scorer, apart, images, DECLARED)):
        assert [(i["name"], i["kind"]) for i in a.labels] == [(i["name"], i["kind"]) for i in b.labels]
        for x, y in zip(a.labels, b.labels):
            assert x["itm"] == pytest.approx(y["itm"], abs=1e-6)
