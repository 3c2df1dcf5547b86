"""The content keys: every setting that changes numbers is in them; where and how fast a run goes is not."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from pipelines import keys
from pipelines.config import JobConfig, build_config

BASE = {"input": "in", "output": "out"}

# What each key holds, listed once more by hand: a field added to a key, or dropped from it,
# fails here until this list (and docs/nightly.md's "Content keys") says so.
SCORE_KEY_FIELDS = {
    "itm_checkpoint", "max_text_tokens", "precision", "device", "jpeg_draft", "vision_attention", "scorer_version",
    "decode_device", "compiled", "cpu_kernels",
}
CAPTION_KEY_FIELDS = {"caption_checkpoint", "prompt", "max_new_tokens", "precision", "device", "jpeg_draft", "captioner_version", "decode_device"}

# Config options that change where or how fast a run goes (or which rows it writes, or how it
# flags them), never a score or a caption.
NOT_IN_KEYS = {
    "input", "output", "overwrite", "run_id", "ray_address", "score_actors", "caption_actors",
    "score_gpus", "caption_gpus", "score_cpus", "caption_cpus", "score_batch_size", "caption_batch_size",
    "decode_batch_size", "report_category_column", "itm_threshold", "itc_threshold", "captions",
    "id_column", "text_column", "image_column", "image_uri_column", "device", "reuse", "dedup",
    # the checkpoints enter by content identity, not by reference
    "itm_model", "caption_model",
    # computed per row in the keyed plan's last pass (language, agreement) or applied to a value
    # carried with the scores (evidence, kept only where this run's policy and layer ask for it);
    # an image over the byte limit gets no key at all, so it is decoded and becomes an error row
    "evidence", "evidence_layer", "agreement_model", "agreement_threshold", "text_languages", "max_image_bytes",
    # where the result is written (a Parquet directory or a Delta table and its partition)
    "output_format", "output_partition", "target_file_mb",
    # batches in flight per actor, and padding rows and tokens that are dropped again (tests: same scores)
    "overlap", "shape_buckets",
    # which columns the run writes: the projections come from the same pass as the scores (a source
    # without them cannot serve a run asking for them: pipelines.reuse.passes.source_file), and the
    # groups are computed over each run's rows after the plan
    "embeddings", "near_duplicates", "near_duplicate_cosine",
    # how image URLs are fetched: bytes are bytes (the key is the hash of the bytes received)
    "storage_backend", "http_timeout", "http_concurrency", "http_per_host", "http_retries", "http_allow_private", "http_user_agent",
}


def _digests(config: JobConfig, itm="sha256:a", caption="sha256:b", device="cpu"):
    return keys.score_settings(config, itm, device).digest, keys.caption_settings(config, caption, device).digest


def test_key_fields_are_the_listed_ones():
    assert {f.name for f in dataclasses.fields(keys.ScoreSettings)} == SCORE_KEY_FIELDS
    assert {f.name for f in dataclasses.fields(keys.CaptionSettings)} == CAPTION_KEY_FIELDS


def test_every_config_option_is_either_in_a_key_or_listed_as_not():
    in_keys = {"max_text_tokens", "precision", "jpeg_draft", "caption_prompt", "max_new_tokens", "vision_attention", "decode_device", "torch_compile", "cpu_kernels",
               "labels"}  # the label key: the file's content, thresholds left out (tests/pipelines/test_labels.py)
    assert set(JobConfig.model_fields) == in_keys | NOT_IN_KEYS


@pytest.mark.parametrize(
    "change, score_moves, caption_moves",
    [
        ({"max_text_tokens": 20}, True, False),
        ({"precision": "bf16"}, True, True),
        ({"precision": "bf16-weights"}, True, True),
        ({"jpeg_draft": True}, True, True),
        ({"decode_device": "gpu"}, True, True),
        ({"caption_prompt": "a photo of"}, False, True),
        ({"max_new_tokens": 7}, False, True),
        ({"vision_attention": "eager"}, True, False),
        ({"cpu_kernels": "torch"}, True, False),
        ({"cpu_kernels": "onednn"}, True, False),
    ],
)
def test_settings_that_change_numbers_change_the_key(change, score_moves, caption_moves):
    base = _digests(build_config(BASE))
    moved = _digests(build_config(dict(BASE, **change)))
    assert (base[0] != moved[0], base[1] != moved[1]) == (score_moves, caption_moves)


def test_vision_attention_keys_only_where_it_differs_from_what_earlier_outputs_used():
    """Before the option, fp32 ran eager and half precision fused: those digests stay as they were."""
    fp32 = build_config(BASE)
    before = dataclasses.asdict(keys.score_settings(fp32, "sha256:a", "cpu"))
    del before["vision_attention"], before["decode_device"], before["compiled"], before["cpu_kernels"]
    earlier_digest = keys._digest(dict(before, kind="score"))
    assert _digests(build_config(dict(BASE, vision_attention="eager", cpu_kernels="torch")))[0] == earlier_digest
    assert _digests(fp32)[0] != earlier_digest  # fused fp32 is new arithmetic
    bf16 = keys.score_settings(build_config(dict(BASE, precision="bf16")), "sha256:a", "cuda")
    bf16_before = {k: v for k, v in dataclasses.asdict(bf16).items() if k not in ("vision_attention", "decode_device", "compiled", "cpu_kernels")}
    assert bf16.digest == keys._digest(dict(bf16_before, kind="score"))
    assert dataclasses.replace(bf16, vision_attention="eager").digest != bf16.digest


def test_cpu_kernels_key_only_where_they_apply_and_torch_keeps_earlier_digests():
    """torch's BLAS is what every output written before the option used; on a GPU, or in half
    precision, the option changes nothing and so keys nothing."""
    settings = keys.score_settings(build_config(dict(BASE, cpu_kernels="torch")), "sha256:a", "cpu")
    body = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("decode_device", "compiled", "cpu_kernels")}
    assert settings.digest == keys._digest(dict(body, kind="score"))
    for device, precision in (("cuda", "auto"), ("cuda", "fp32"), ("cpu", "bf16")):
        digests = {
            keys.score_settings(build_config(dict(BASE, cpu_kernels=kernels, precision=precision)), "sha256:a", device).digest
            for kernels in ("auto", "onednn", "torch")
        }
        assert len(digests) == 1, (device, precision)
    assert keys.score_settings(build_config(dict(BASE, cpu_kernels="onednn")), "sha256:a", "cpu").cpu_kernels == "onednn"


def test_checkpoint_identity_device_and_versions_are_in_the_key():
    config = build_config(BASE)
    base = _digests(config)
    assert _digests(config, itm="sha256:other")[0] != base[0] and _digests(config, itm="sha256:other")[1] == base[1]
    assert _digests(config, caption="sha256:other")[1] != base[1]
    assert _digests(config, device="cuda") != base
    assert dataclasses.replace(keys.score_settings(config, "sha256:a", "cpu"), scorer_version=99).digest != base[0]
    assert dataclasses.replace(keys.caption_settings(config, "sha256:b", "cpu"), captioner_version=99).digest != base[1]


@pytest.mark.parametrize("option", [
    {"score_batch_size": 3}, {"caption_batch_size": 3}, {"decode_batch_size": 3}, {"score_actors": "2,4"},
    {"caption_actors": "1,8"}, {"score_gpus": 0.5}, {"caption_cpus": 2}, {"ray_address": "auto"},
    {"itm_threshold": 0.9}, {"captions": "flagged"}, {"run_id": "x"}, {"output": "elsewhere"},
    {"itm_model": "/another/path/same/weights"}, {"overlap": "on"}, {"overlap": "off"}, {"shape_buckets": True},
    {"torch_compile": True},  # on the CPU compile is ignored, so the numbers are the eager ones
])
def test_batch_sizes_pools_resources_and_paths_are_not_in_the_key(option):
    assert _digests(build_config(dict(BASE, **option))) == _digests(build_config(BASE))


def test_auto_precision_on_the_cpu_is_fp32():
    assert _digests(build_config(dict(BASE, precision="auto"))) == _digests(build_config(dict(BASE, precision="fp32")))
    assert keys.effective_precision("auto", "cuda") != "fp32"


def test_row_keys_are_null_where_content_is_missing():
    image = pa.array([keys.sha256_hex(b"x"), None, keys.sha256_hex(b"x"), keys.sha256_hex(b"y")])
    text = pa.array([keys.text_sha256("a"), keys.text_sha256("a"), None, keys.text_sha256("a")])
    score = keys.score_keys("d", image, text).to_pylist()
    assert score[1] is None and score[2] is None and score[0] != score[3]
    assert keys.score_keys("d", image, text).to_pylist()[0] == score[0]
    assert keys.score_keys("e", image, text).to_pylist()[0] != score[0]
    caption = keys.caption_keys("d", image).to_pylist()
    assert caption[0] == caption[2] and caption[1] is None
    assert keys.text_sha256(None) is None and keys.sha256_hex(None) is None
    assert keys.text_sha256("é") == __import__("hashlib").sha256("é".encode()).hexdigest()


def test_cpu_decoding_keeps_the_digests_outputs_written_before_decode_device_have():
    """Left out of the digest at its default, so earlier committed outputs still match."""
    config = build_config(BASE)
    settings = keys.score_settings(config, "sha256:a", "cpu")
    body = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("decode_device", "compiled")}
    assert settings.digest == keys._digest(dict(body, kind="score"))
    assert settings.cpu_kernels == "auto"  # the default oneDNN projections are new arithmetic: keyed
    caption = keys.caption_settings(config, "sha256:b", "cpu")
    body = {k: v for k, v in dataclasses.asdict(caption).items() if k != "decode_device"}
    assert caption.digest == keys._digest(dict(body, kind="caption"))


def test_bf16_weights_is_its_own_precision_and_compile_keys_only_on_cuda():
    weights = _digests(build_config(dict(BASE, precision="bf16-weights")), device="cuda")
    assert weights != _digests(build_config(dict(BASE, precision="bf16")), device="cuda")
    eager = keys.score_settings(build_config(BASE), "sha256:a", "cuda")
    compiled = keys.score_settings(build_config(dict(BASE, torch_compile=True)), "sha256:a", "cuda")
    assert compiled.compiled and compiled.digest != eager.digest
    # Off, the field is left out of the digest: keys written before it existed still match.
    assert eager.digest == keys._digest(dict(
        {k: v for k, v in dataclasses.asdict(eager).items() if k not in ("compiled", "decode_device", "vision_attention", "cpu_kernels")},
        kind="score"))


LABEL_KEY_FIELDS = {"score_settings", "label_file", "labeler_version"}


def test_the_label_key_holds_the_score_settings_and_the_label_file():
    assert {f.name for f in dataclasses.fields(keys.LabelSettings)} == LABEL_KEY_FIELDS
    labels = {"categories": {"column": "c", "names": ["sofa", "bed"]}}
    config = build_config(dict(BASE, labels=labels))
    score, _ = _digests(config)
    base = keys.label_settings(score, config.labels).digest
    assert keys.label_settings(score, build_config(dict(BASE, labels={"categories": {
        "column": "c", "names": ["sofa", "bed"], "threshold": 0.9}})).labels).digest == base
    assert keys.label_settings(score, build_config(dict(BASE, labels={"categories": {
        "column": "c", "names": ["sofa", "bed", "chair"]}})).labels).digest != base
    assert keys.label_settings(_digests(build_config(dict(BASE, max_text_tokens=20)))[0], config.labels).digest != base
    image = pa.array(["i1", "i1", "i2", None])
    rows = keys.label_keys(base, image, pa.array(["sofa", "sofa", "sofa", "sofa"])).to_pylist()
    assert rows[0] == rows[1] != rows[2] and rows[3] is None
    assert keys.label_keys(base, image, pa.array(["bed", None, "-", "-"])).to_pylist()[1] is None
