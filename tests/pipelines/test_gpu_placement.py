"""--device cuda with an actor that reserves no GPU is refused (exit 2) before anything runs."""

from __future__ import annotations

import pytest

from jobs import score
from pipelines.config import ConfigError, build_config

BASE = {"input": "in", "output": "out"}


@pytest.mark.parametrize("option, named", [
    ({"score_gpus": 0}, "score_gpus=0"),
    ({"caption_gpus": 0}, "caption_gpus=0"),
    ({"score_gpus": 0, "caption_gpus": "0"}, "score_gpus=0 and caption_gpus=0"),
])
def test_cuda_with_a_stage_reserving_no_gpu_is_refused(option, named):
    with pytest.raises(ConfigError, match=named):
        build_config(dict(BASE, device="cuda", **option))


@pytest.mark.parametrize("values", [
    dict(device="cuda", caption_gpus=0, captions="none"),  # no caption actors at all
    dict(device="cuda", score_gpus=0.5, caption_gpus=0.25),
    dict(device="auto", score_gpus=0),  # auto puts that actor on the CPU (pipelines.dataflow.resources)
    dict(device="cpu", score_gpus=0),
])
def test_placements_that_can_run_are_kept(values):
    build_config(dict(BASE, **values))


def test_the_cli_exits_2_naming_the_flags(tmp_path, capsys):
    code = score.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--device", "cuda", "--caption-gpus", "0"])
    assert code == score.EXIT_USAGE
    assert "caption_gpus=0" in capsys.readouterr().err
