"""--decode-device cpu|gpu: every way to set it reaches the stages, and gpu without torchvision is exit 2."""

import pandas as pd
import pytest

from blip_ops import jpeg_device
from blip_ops.samples import sample_catalog
from jobs import nightly, score
from pipelines.config import ConfigError, build_config
from pipelines.dataflow.graph import caption_stage_kwargs, decode_kwargs, score_stage_kwargs
from pipelines.dataflow.resources import resolve_resources
from pipelines.preflight import InputError, check_models
from tests.conftest import write_catalog

BASE = ["--input", "a", "--output", "b"]
MISSING = "--decode-device gpu needs torchvision (its nvJPEG decoder): cannot import it (test)"


def _config(argv):
    return score.config_from_args(score.make_parser().parse_args(argv))


def _reached(config) -> set:
    resources = resolve_resources(config, 0, 2)
    return {decode_kwargs(config)["decode_device"], score_stage_kwargs(config, resources)["decode_device"],
            caption_stage_kwargs(config, resources)["decode_device"]}


def test_default_flag_and_yaml_reach_the_decode_and_model_stages(tmp_path):
    assert _config(BASE).decode_device == "cpu" and _reached(_config(BASE)) == {"cpu"}
    assert _reached(_config([*BASE, "--decode-device", "gpu"])) == {"gpu"}
    for spelling in ("decode_device", "decode-device"):
        (tmp_path / "job.yaml").write_text(f"input: a\noutput: b\n{spelling}: gpu\n")
        assert _config(["--config", str(tmp_path / "job.yaml")]).decode_device == "gpu"
        assert _config(["--config", str(tmp_path / "job.yaml"), "--decode-device", "cpu"]).decode_device == "cpu"
    with pytest.raises(ConfigError, match="decode_device"):
        _config([*BASE, "--decode-device", "tpu"])


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setattr(jpeg_device, "torchvision_problem", lambda: MISSING)


def test_gpu_decoding_without_torchvision_exits_2_before_any_model_loads(tiny_itm, tmp_path, capsys, no_torchvision):
    catalog = write_catalog(tmp_path / "catalog", sample_catalog(4, seed=1), files=1)
    argv = ["--input", str(catalog), "--output", str(tmp_path / "o"), "--itm-model", tiny_itm, "--caption-model", "none"]
    assert score.main([*argv, "--decode-device", "gpu"]) == 2
    assert MISSING in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert score.main([*argv, "--decode-device", "tpu"]) == 2


def test_nightly_takes_the_option_and_refuses_gpu_without_torchvision_at_once(tmp_path, capsys, no_torchvision):
    write_catalog(tmp_path / "catalog" / "dt=2026-11-30", sample_catalog(4, seed=1), files=1)
    args = nightly.make_parser().parse_args(["--catalog", "c", "--output", "o", "--decode-device", "gpu"])
    assert args.decode_device == "gpu"
    code = nightly.main(["--catalog", str(tmp_path / "catalog"), "--output", str(tmp_path / "out"), "--decode-device", "gpu"])
    assert code == 2 and MISSING in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_model_checks_and_audit_refuse_gpu_without_torchvision(tiny_itm, monkeypatch, no_torchvision):
    from jobs.audit import audit

    config = build_config({"input": "a", "output": "b", "itm_model": tiny_itm, "caption_model": "none", "decode_device": "gpu"})
    with pytest.raises(InputError, match="needs torchvision"):
        check_models(config)
    frame = pd.DataFrame(sample_catalog(2, seed=1)).drop(columns=["expected"])
    with pytest.raises(InputError, match="needs torchvision"):
        audit(frame, itm_model=tiny_itm, caption_model="none", decode_device="gpu")
    monkeypatch.setattr(jpeg_device, "torchvision_problem", lambda: None)
    check_models(config)  # with a decoder, nothing to refuse
    check_models(build_config({"input": "a", "output": "b", "itm_model": tiny_itm, "caption_model": "none"}))
