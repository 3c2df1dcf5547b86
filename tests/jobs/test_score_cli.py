"""The command-line contract: options, YAML, exit codes, and a real run."""

import json
import os
from collections import Counter
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from jobs import score
from tests.conftest import write_catalog

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "jobs.score", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_catalog(tmp_path_factory.mktemp("cli-catalog"), sample_catalog(10, seed=5), files=2)


def _models(tiny_itm, tiny_caption=None):
    return ["--itm-model", tiny_itm, "--caption-model", tiny_caption or "none", "--device", "cpu"]


def _main(capsys, *args) -> tuple[int, str]:
    """The CLI in process, as ``python -m jobs.score`` runs it (``sys.exit(main())``): its exit code
    and stderr. These inputs are refused before Ray or torch is imported, so each costs
    milliseconds instead of a Python start (seconds on a loaded machine);
    ``test_usage_errors_exit_2`` and ``test_cli_subprocess_starts_its_own_ray`` keep the real
    entry point covered."""
    try:
        code = score.main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


def test_missing_column_exits_2_before_loading(catalog, tiny_itm, tmp_path, capsys):
    code, err = _main(capsys, "--input", str(catalog), "--output", str(tmp_path / "o"), "--text-column", "title", *_models(tiny_itm))
    assert code == 2
    assert "no column 'title'" in err
    assert not (tmp_path / "o").exists()


def test_wrong_column_type_exits_2(tiny_itm, tmp_path, capsys):
    pq.write_table(pa.table({"id": [1], "text": ["x"], "image": ["not-bytes"]}), tmp_path / "c.parquet")
    code, err = _main(capsys, "--input", str(tmp_path / "c.parquet"), "--output", str(tmp_path / "o"), *_models(tiny_itm))
    assert code == 2 and "must be a binary column" in err


@pytest.mark.parametrize(
    "option, value",
    [("--id-column", "sku"), ("--image-column", "picture"), ("--image-uri-column", "uri")],
)
def test_every_missing_column_exits_2(option, value, catalog, tiny_itm, tmp_path, capsys):
    # In process: preflight fails before Ray or torch is imported, so this costs milliseconds.
    code = score.main(["--input", str(catalog), "--output", str(tmp_path / "o"), option, value, *_models(tiny_itm)])
    assert code == 2
    assert f"no column '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"id": [1], "text": [3], "image": [b"x"]}, "column 'text' must be a string column"),
        ({"id": [1], "text": ["x"], "uri": [7]}, "column 'uri' must be a string column"),
    ],
)
def test_text_and_uri_columns_of_the_wrong_type_exit_2(columns, message, tiny_itm, tmp_path, capsys):
    pq.write_table(pa.table(columns), tmp_path / "c.parquet")
    extra = ["--image-uri-column", "uri"] if "uri" in columns else []
    code = score.main(["--input", str(tmp_path / "c.parquet"), "--output", str(tmp_path / "o"), *extra, *_models(tiny_itm)])
    assert code == 2 and message in capsys.readouterr().err


def test_empty_dataset_is_a_successful_zero_row_run(ray_session, tiny_itm, tmp_path, capsys):
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary())])
    write_catalog(tmp_path / "catalog", [], files=1, schema=schema)
    code = score.main(["--input", str(tmp_path / "catalog"), "--output", str(tmp_path / "o"), *_models(tiny_itm), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows_read"] == summary["rows_written"] == 0
    assert pq.read_table(tmp_path / "o").num_rows == 0


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "not_parquet"])
def test_unusable_input_exits_2(kind, tiny_itm, tmp_path, capsys):
    path = tmp_path / "input"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "not_parquet":
        path.mkdir()
        (path / "data.parquet").write_text("id,text\n1,hello\n")
    code, err = _main(capsys, "--input", str(path), "--output", str(tmp_path / "o"), *_models(tiny_itm))
    assert code == 2
    assert {"missing": "does not exist", "empty_dir": "no Parquet files", "not_parquet": "not readable as Parquet"}[kind] in err


def test_bad_model_paths_exit_2(catalog, tiny_itm, tiny_caption, tmp_path, capsys):
    code, err = _main(capsys, "--input", str(catalog), "--output", str(tmp_path / "o"), *_models(str(tmp_path / "nope")))
    assert code == 2 and "model directory does not exist" in err
    code, err = _main(capsys, "--input", str(catalog), "--output", str(tmp_path / "o"), *_models(tiny_caption))
    assert code == 2 and "not a BLIP image-text retrieval checkpoint" in err
    code, err = _main(capsys, "--input", str(catalog), "--output", str(tmp_path / "o"), *_models(tiny_itm, tiny_itm))
    assert code == 2 and "not a BLIP-2 captioning checkpoint" in err


def test_usage_errors_exit_2(catalog, tiny_itm, tmp_path, capsys):
    assert _run("--output", str(tmp_path)).returncode == 2  # no input: through the real entry point, once
    code, err = _main(capsys, "--input", str(catalog), "--output", str(tmp_path), "--no-such-flag", "1")
    assert code == 2 and "unrecognized arguments" in err
    code, err = _main(capsys, "--input", str(catalog), "--output", str(tmp_path / "o"), "--score-actors", "4,2", *_models(tiny_itm))
    assert code == 2 and "score_actors" in err
    (tmp_path / "job.yaml").write_text("itm_threshold: 0.4\nno_such_key: 1\n")
    code, err = _main(capsys, "--config", str(tmp_path / "job.yaml"), "--input", str(catalog), "--output", str(tmp_path / "o"))
    assert code == 2 and "no_such_key: unknown option" in err


def test_yaml_values_and_flag_overrides(tmp_path):
    (tmp_path / "job.yaml").write_text("input: a\noutput: b\nitm-threshold: 0.4\nitc_threshold: none\ncaptions: flagged\n")
    args = score.make_parser().parse_args(["--config", str(tmp_path / "job.yaml"), "--itm-threshold", "0.7"])
    config = score.config_from_args(args)
    assert (config.itm_threshold, config.itc_threshold, config.captions) == (0.7, None, "flagged")
    assert config.input == "a" and config.output == "b"


def test_end_to_end_in_process_with_device_cpu(ray_session, catalog, tiny_itm, tiny_caption, tmp_path, capsys):
    code = score.main(
        ["--input", str(catalog), "--output", str(tmp_path / "o"), *_models(tiny_itm, tiny_caption),
         "--captions", "flagged", "--max-new-tokens", "4", "--score-actors", "1,2", "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows_read"] == summary["rows_written"] == 10
    # Each record's defect is known: the counts must match them, not merely add up to 10.
    expected = Counter(r["expected"] for r in sample_catalog(10, seed=5))
    assert summary["scored"] == expected["match"] + expected["mismatch"]
    assert summary["errors"] == {k: expected[k] for k in ("image_error", "text_error") if expected[k]}
    table = pq.read_table(tmp_path / "o")
    assert table.num_rows == 10
    by_status = Counter(zip(table.column("expected").to_pylist(), table.column("status").to_pylist()))
    assert all(status == ("ok" if kind in ("match", "mismatch") else kind) for kind, status in by_status)


def test_failed_run_exits_1_and_commits_nothing(ray_session, catalog, tiny_itm, tmp_path, capsys):
    broken = tmp_path / "broken-itm"
    broken.mkdir()
    for item in Path(tiny_itm).iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"corrupt weights")
    code = score.main(["--input", str(catalog), "--output", str(tmp_path / "o"), *_models(str(broken))])
    assert code == 1
    assert "run failed" in capsys.readouterr().err
    assert not (tmp_path / "o" / "_manifest.json").exists()
    assert not list((tmp_path / "o").glob("*.parquet"))


@pytest.mark.parametrize(
    "flags, numbers",
    [
        (["--score-actors", "2,2", "--score-cpus", "1"], "2 scoring actors x 1 = 2 CPUs of the cluster's 2, leaving 0"),
        (["--score-cpus", "2"], "1 scoring actor x 2 = 2 CPUs of the cluster's 2, leaving 0"),
    ],
)
def test_a_plan_that_starves_decoding_exits_2_before_any_actor_starts(ray_session, catalog, tiny_itm, tmp_path, capsys, flags, numbers):
    # ray_session is a 2-CPU local Ray: these settings used to hang at "0 rows scored" forever.
    code = score.main(["--input", str(catalog), "--output", str(tmp_path / "o"), *_models(tiny_itm), *flags])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert numbers in err and "--score-cpus (now" in err and "--score-actors MIN (now" in err
    assert not list((tmp_path / "o").glob("**/*.parquet"))


def test_cli_subprocess_starts_its_own_ray(catalog, tiny_itm, tmp_path):
    result = _run("--input", str(catalog), "--output", str(tmp_path / "o"), *_models(tiny_itm), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read 10 rows" in result.stdout and str(tmp_path / "o") in result.stdout
    assert pq.read_table(tmp_path / "o").num_rows == 10


def test_console_script_dispatch():
    from jobs.cli import main

    assert main([]) == 2
    assert main(["bogus"]) == 2


def test_caption_prompt_reaches_the_caption_stage_from_the_cli_and_yaml(tmp_path):
    from pipelines.dataflow.graph import caption_stage_kwargs
    from pipelines.dataflow.resources import resolve_resources

    base = ["--input", "a", "--output", "b", "--device", "cpu"]

    def prompt(args):
        config = score.config_from_args(score.make_parser().parse_args(args))
        return caption_stage_kwargs(config, resolve_resources(config, 0, 2))["prompt"]

    assert prompt(base) is None
    assert prompt([*base, "--caption-prompt", "a photo of"]) == "a photo of"
    assert prompt([*base, "--caption-prompt", "none"]) is None
    (tmp_path / "job.yaml").write_text("input: a\noutput: b\ncaption-prompt: a picture of\n")
    assert prompt(["--config", str(tmp_path / "job.yaml")]) == "a picture of"
    assert prompt(["--config", str(tmp_path / "job.yaml"), "--caption-prompt", "off"]) is None


def test_jpeg_draft_flag_reaches_the_decode_stage(tmp_path):
    from jobs import nightly
    from pipelines.dataflow.graph import decode_kwargs

    base = ["--input", "a", "--output", "b"]
    assert score.config_from_args(score.make_parser().parse_args(base)).jpeg_draft is False
    config = score.config_from_args(score.make_parser().parse_args([*base, "--jpeg-draft"]))
    assert config.jpeg_draft is True and decode_kwargs(config)["jpeg_draft"] is True
    (tmp_path / "job.yaml").write_text("input: a\noutput: b\njpeg_draft: true\n")
    assert score.config_from_args(score.make_parser().parse_args(["--config", str(tmp_path / "job.yaml")])).jpeg_draft
    assert nightly.make_parser().parse_args(["--catalog", "c", "--output", "o", "--jpeg-draft"]).jpeg_draft is True


def test_limit_agreement_and_language_flags(tmp_path):
    from jobs import nightly

    flags = ["--max-image-bytes", "2048", "--agreement-model", "none", "--text-languages", "en,fr"]
    config = score.config_from_args(score.make_parser().parse_args(["--input", "a", "--output", "b", *flags]))
    assert (config.max_image_bytes, config.agreement_model, config.text_languages) == (2048, None, ("en", "fr"))
    config = score.config_from_args(score.make_parser().parse_args(
        ["--input", "a", "--output", "b", "--agreement-threshold", "0.3", "--text-languages", "any"]))
    assert (config.agreement_threshold, config.text_languages) == (0.3, None)
    args = vars(nightly.make_parser().parse_args(["--catalog", "c", "--output", "o", *flags, "--agreement-threshold", "0.3"]))
    assert (args["max_image_bytes"], args["text_languages"], args["agreement_threshold"]) == ("2048", "en,fr", "0.3")


def test_target_file_mb_from_flag_yaml_and_nightly(tmp_path):
    from jobs import nightly
    from pipelines.config import ConfigError

    assert score.config_from_args(score.make_parser().parse_args(["--input", "a", "--output", "b"])).target_file_mb == 128.0
    config = score.config_from_args(score.make_parser().parse_args(["--input", "a", "--output", "b", "--target-file-mb", "64"]))
    assert config.target_file_mb == 64.0
    path = tmp_path / "job.yaml"
    path.write_text("target-file-mb: 0.5\n")
    config = score.config_from_args(score.make_parser().parse_args(["--config", str(path), "--input", "a", "--output", "b"]))
    assert config.target_file_mb == 0.5
    with pytest.raises(ConfigError, match="target_file_mb"):
        score.config_from_args(score.make_parser().parse_args(["--input", "a", "--output", "b", "--target-file-mb", "0"]))
    assert vars(nightly.make_parser().parse_args(["--catalog", "c", "--output", "o", "--target-file-mb", "256"]))["target_file_mb"] == "256"
