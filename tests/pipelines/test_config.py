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


@pytest.mark.parametrize("word", ["none", "None", "NONE"])
def test_none_turns_optional_settings_off(word):
    config = build_config(dict(BASE, itm_threshold=word, itc_threshold=word, caption_model=word))
    assert config.itm_threshold is None and config.itc_threshold is None
    assert config.caption_model is None and config.captions == "none" and not config.captioning
    assert config.recorded_caption_model is None


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
    ],
)
def test_invalid_values_name_the_option(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(dict(BASE, **override))


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
