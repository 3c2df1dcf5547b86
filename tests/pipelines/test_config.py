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
