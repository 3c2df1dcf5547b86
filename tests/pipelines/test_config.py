import pytest

from pipelines.config import DEFAULT_CAPTION_MODEL, DEFAULT_ITM_MODEL, ConfigError, build_config, load_yaml

BASE = {"input": "in", "output": "out"}


def test_defaults_follow_the_contract():
    config = build_config(BASE)
    assert config.itm_model == DEFAULT_ITM_MODEL and config.caption_model == DEFAULT_CAPTION_MODEL
    assert config.captions == "all" and config.max_new_tokens == 30 and config.max_text_tokens == 35
    assert config.itm_threshold == 0.5 and config.itc_threshold == 0.2
    assert (config.id_column, config.text_column, config.image_column) == ("id", "text", "image")
    assert config.device == "auto" and config.ray_address is None


NONE_SETTINGS = (
    "caption_model", "caption_prompt", "itm_threshold", "itc_threshold", "image_uri_column", "ray_address",
    "score_gpus", "caption_gpus", "score_cpus", "caption_cpus", "report_category_column",
)


@pytest.mark.parametrize("word", ["none", "None", "NONE", "off", "OFF", "null", "Null", "", "  ", " off "])
def test_none_turns_optional_settings_off(word):
    config = build_config(dict(BASE, **{name: word for name in NONE_SETTINGS}))
    assert {name: getattr(config, name) for name in NONE_SETTINGS} == dict.fromkeys(NONE_SETTINGS)
    assert config.captions == "none" and not config.captioning and config.recorded_caption_model is None


def test_a_none_word_inside_a_value_is_a_value():
    config = build_config(dict(BASE, caption_prompt="none of these", image_uri_column="off_site"))
    assert (config.caption_prompt, config.image_uri_column) == ("none of these", "off_site")


def test_captions_policy_without_caption_model_is_an_error():
    with pytest.raises(ConfigError, match="needs a caption model"):
        build_config(dict(BASE, caption_model="none", captions="flagged"))


def test_captions_none_keeps_model_out_of_the_record():
    config = build_config(dict(BASE, captions="none"))
    assert not config.captioning and config.recorded_caption_model is None


@pytest.mark.parametrize("value, expected", [("1,4", (1, 4)), ("2", (2, 2)), ([1, 3], (1, 3)), (2, (2, 2))])
def test_actor_ranges(value, expected):
    assert build_config(dict(BASE, score_actors=value)).score_actors == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ({"score_actors": "3,1"}, "score_actors"),
        ({"caption_actors": "0,2"}, "caption_actors"),
        ({"score_actors": "a,b"}, "score_actors"),
        ({"itm_threshold": 1.5}, "itm_threshold"),
        ({"itc_threshold": -2}, "itc_threshold"),
        ({"max_text_tokens": 1}, "max_text_tokens"),
        ({"score_gpus": -1}, "score_gpus"),
        ({"captions": "some"}, "captions"),
        ({"device": "tpu"}, "device"),
        ({"score_batch_size": 0}, "score_batch_size"),
        ({"bogus_option": 1}, "bogus_option: unknown option"),
        ({"text_column": "  "}, "text_column"),
        ({"score_actors": "1,2,3"}, "score_actors: expected MIN,MAX"),
        ({"caption_actors": [1, 2, 3]}, "caption_actors"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 513}, "max_new_tokens"),
        ({"caption_gpus": -0.5}, "caption_gpus"),
        ({"score_cpus": 0}, "score_cpus"),
        ({"caption_cpus": 0}, "caption_cpus"),
        ({"caption_cpus": -1}, "caption_cpus"),
        ({"vision_attention": "flash"}, "vision_attention"),
        *[({name: blank}, name) for name in ("input", "output", "itm_model", "id_column", "image_column") for blank in ("", "  ")],
    ],
)
def test_invalid_values_name_the_option(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(dict(BASE, **override))


@pytest.mark.parametrize(
    "override",
    [{"max_new_tokens": 1}, {"max_new_tokens": 512}, {"caption_gpus": 0}, {"score_cpus": 0.01}, {"caption_cpus": 0.25}],
)
def test_bounds_are_inclusive_where_documented(override):
    config = build_config(dict(BASE, **override))
    assert {name: getattr(config, name) for name in override} == override


def test_fractional_gpus_are_allowed():
    config = build_config(dict(BASE, score_gpus="0.5", caption_gpus=0.5))
    assert config.score_gpus == 0.5 and config.caption_gpus == 0.5


def test_yaml_loading(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("itm-threshold: 0.3\ncaptions: flagged\n")
    assert load_yaml(path) == {"itm_threshold": 0.3, "captions": "flagged"}
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")


def test_limits_agreement_and_language_defaults():
    config = build_config(BASE)
    assert config.max_image_bytes == 50 * 1024 * 1024
    assert config.agreement_model == "sentence-transformers/all-MiniLM-L6-v2" and config.agreement_threshold is None
    assert config.agreeing and config.text_languages == ("en",)
    assert not build_config(dict(BASE, captions="none")).agreeing  # agreement needs captions


@pytest.mark.parametrize("value, expected", [
    ("en", ("en",)), ("en, DE,en", ("en", "de")), (["fr", "it"], ("fr", "it")), ("any", None), ("ANY", None), ("none", None),
])
def test_text_languages(value, expected):
    assert build_config(dict(BASE, text_languages=value)).text_languages == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ({"text_languages": "english"}, "text_languages: expected ISO 639-1"),
        ({"text_languages": "en,"}, None),  # a trailing comma is harmless
        ({"max_image_bytes": 0}, "max_image_bytes"),
        ({"agreement_threshold": 1.5}, "agreement_threshold"),
        ({"agreement_threshold": 0.3, "captions": "none"}, "agreement_threshold needs captions"),
        ({"agreement_threshold": 0.3, "agreement_model": "none"}, "agreement_threshold needs captions"),
    ],
)
def test_new_options_are_validated(override, message):
    if message is None:
        build_config(dict(BASE, **override))
        return
    with pytest.raises(ConfigError, match=message):
        build_config(dict(BASE, **override))


def test_vision_attention_defaults_to_fused_and_reaches_the_score_stage(tmp_path):
    from types import SimpleNamespace

    from pipelines.dataflow.graph import score_stage_kwargs

    resources = SimpleNamespace(score_device="cpu", score_threads=2)
    assert score_stage_kwargs(build_config(BASE), resources)["vision_attention"] == "fused"
    path = tmp_path / "job.yaml"
    path.write_text("vision-attention: eager\n")
    config = build_config(dict(BASE, **load_yaml(path)))
    assert score_stage_kwargs(config, resources)["vision_attention"] == "eager"


def test_new_options_in_yaml_reach_the_stages(tmp_path):
    from types import SimpleNamespace

    from pipelines.dataflow.graph import caption_stage_kwargs, decode_kwargs, flag_kwargs

    path = tmp_path / "job.yaml"
    path.write_text("max-image-bytes: 1000\nagreement_model: none\ntext_languages: [en, de]\n")
    config = build_config(dict(BASE, **load_yaml(path)))
    assert (config.max_image_bytes, config.agreement_model, config.text_languages) == (1000, None, ("en", "de"))
    assert decode_kwargs(config)["max_image_bytes"] == 1000 and decode_kwargs(config)["detect_language"] is True
    assert flag_kwargs(config)["text_languages"] == ("en", "de")
    resources = SimpleNamespace(caption_device="cpu", caption_threads=1, caption_gpus=0, caption_batch_size=16)  # all the caption stage's arguments read
    assert caption_stage_kwargs(config, resources)["agreement_model"] is None
    path.write_text("agreement_threshold: 0.25\ntext_languages: any\n")
    config = build_config(dict(BASE, **load_yaml(path)))
    kwargs = caption_stage_kwargs(config, resources)
    assert (kwargs["agreement_model"], kwargs["agreement_threshold"]) == ("sentence-transformers/all-MiniLM-L6-v2", 0.25)
    assert decode_kwargs(config)["detect_language"] is False and flag_kwargs(config)["text_languages"] is None


def test_output_partition_needs_delta_and_name_equals_value():
    from pipelines.config import ConfigError, build_config

    base = {"input": "in", "output": "out"}
    assert build_config(dict(base, output_format="delta", output_partition="dt=2026-01-01")).output_partition == "dt=2026-01-01"
    with pytest.raises(ConfigError, match="needs output_format delta"):
        build_config(dict(base, output_partition="dt=2026-01-01"))
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        build_config(dict(base, output_format="delta", output_partition="2026-01-01"))
    with pytest.raises(ConfigError, match="output_format"):
        build_config(dict(base, output_format="orc"))
