"""cpu_bench: the job's steady rate from its progress lines, the catalog, and the Data-Juicer side."""

import pytest

from benchmarks.cpu_bench import find_datajuicer, steady_rate

STDERR = """\
2026-12-01 10:00:00 progress: 0/1000 rows scored (0%), 0.0 rows/s
2026-12-01 10:00:05 progress: 0/1000 rows scored (0%), 0.0 rows/s
2026-12-01 10:00:10 progress: 64/1000 rows scored (6%), 6.4 rows/s
2026-12-01 10:00:20 progress: 128/1000 rows scored (13%), 6.4 rows/s
2026-12-01 10:01:10 progress: 1000/1000 rows scored (100%), 14.3 rows/s
2026-12-01 10:01:11 done: 1000 rows scored in 1m11s (14.1 rows/s)
"""


def test_steady_rate_starts_at_the_first_scored_rows():
    steady = steady_rate(STDERR)
    assert steady == {"first_rows_after_s": 10.0, "rows": 936, "seconds": 60.0, "pairs_per_s": 15.6}
    assert steady_rate("2026-12-01 10:00:00 progress: 0/10 rows scored (0%), 0.0 rows/s\n") is None


def test_the_catalog_repeats_pairs_unless_distinct(tmp_path):
    # The default catalog's repetition is what dedup collapses; --distinct must leave it nothing.
    import pyarrow.parquet as pq

    from benchmarks.cpu_bench import write_catalog

    def pairs(directory):
        table = pq.read_table(directory)
        return len(set(zip(table.column("image").to_pylist(), table.column("text").to_pylist())))

    assert pairs(write_catalog(tmp_path / "a", 200, rows_per_group=32)) <= 48
    assert pairs(write_catalog(tmp_path / "b", 200, rows_per_group=32, distinct=True)) == 200


# Data-Juicer, the third side: its output and progress parsed without its venv, and one real
# run on a tiny catalog where the venv exists (bash benchmarks/datajuicer/setup.sh).

DJ_PYTHON, DJ_WHY = find_datajuicer(None)

DJ_STDERR = (
    "2026-12-01 12:09:25.177 | INFO     | data_juicer.utils.process_utils:161 - Set the auto `num_proc` to 2 of Op[image_text_matching_filter]\n"
    "image_text_matching_filter_compute_stats (num_proc=2):   0%|          | 0/300 [00:00<?, ? examples/s]\n"
    "Loading weights: 100%|##########| 244/244 [00:00<00:00, 32048.67it/s]\n"
    "image_text_matching_filter_compute_stats (num_proc=2):   0%|          | 1/300 [00:07<35:00,  7.24s/ examples]\r"
    "image_text_matching_filter_compute_stats (num_proc=2):  50%|#####     | 150/300 [00:47<00:40,  3.7 examples/s]\r"
    "image_text_matching_filter_compute_stats (num_proc=2): 100%|##########| 300/300 [01:27<00:00,  3.8 examples/s]\n"
    "image_text_matching_filter_process (num_proc=2): 100%|##########| 300/300 [00:00<00:00, 92.69 examples/s]\n"
    "2026-12-01 12:10:53.125 | INFO     | data_juicer.core.data.dj_dataset:310 - [1/1] OP [image_text_matching_filter] Done in 88.954s. Left 300 samples.\n"
)


def test_datajuicer_progress_reads_processes_op_time_and_steady_rate():
    from benchmarks.cpu_bench import datajuicer_progress

    progress = datajuicer_progress(DJ_STDERR)
    # Steady: from the first scored row (7 s into the bar, models loaded) to the last update;
    # the process bar (the filtering pass) is not the scoring pass and is not read.
    assert progress == {
        "num_proc": 2, "op_s": 88.954,
        "steady": {"first_rows_after_s": 7, "rows": 299, "seconds": 80, "pairs_per_s": 3.74},
    }
    assert datajuicer_progress("nothing of Data-Juicer's here\n") == {"num_proc": None, "op_s": None, "steady": None}


def test_datajuicer_scores_and_their_agreement_with_ours():
    from benchmarks.cpu_bench import datajuicer_scores, itm_difference

    rows = [
        {"id": "a", "__dj__stats__": '{"image_text_matching_score": [0.25]}'},  # its Parquet export: JSON text
        {"id": "b", "__dj__stats__": {"image_text_matching_score": [0.75]}},
    ]
    theirs = datajuicer_scores(rows)
    assert theirs == {"a": 0.25, "b": 0.75}
    assert itm_difference({"a": (0.9, 0.25), "b": (0.1, 0.7500004)}, theirs) == pytest.approx(4e-7)  # ITM only, not ITC
    with pytest.raises(RuntimeError, match="different rows"):
        itm_difference({"a": (0.0, 0.25)}, theirs)
    with pytest.raises(RuntimeError, match="0 ITM scores"):
        datajuicer_scores([{"id": "c", "__dj__stats__": '{"image_text_matching_score": []}'}])


def test_datajuicer_input_is_the_same_rows_in_its_layout(tmp_path):
    import pyarrow.parquet as pq

    from benchmarks.cpu_bench import (
        DJ_EOC_TOKEN,
        DJ_IMAGE_TOKEN,
        datajuicer_config,
        write_catalog,
        write_datajuicer_input,
    )

    catalog = write_catalog(tmp_path / "catalog", 5, rows_per_group=32, distinct=True)
    ours = pq.read_table(catalog).to_pylist()
    theirs = pq.read_table(write_datajuicer_input(catalog, tmp_path / "dj.parquet")).to_pylist()
    assert [r["id"] for r in theirs] == [r["id"] for r in ours]
    for mine, dj in zip(ours, theirs):
        assert dj["text"] == f"{DJ_IMAGE_TOKEN} {mine['text']} {DJ_EOC_TOKEN}"  # Data-Juicer strips both tokens and the spaces
        assert dj["images"] == [mine["id"]] and dj["image_bytes"] == [mine["image"]]
    config = datajuicer_config(tmp_path / "dj.parquet", tmp_path / "out.parquet", "/ckpt")
    assert config["process"] == [{"image_text_matching_filter": {"hf_blip": "/ckpt", "min_score": 0.0, "max_score": 1.0}}]
    assert config["keep_stats_in_res_ds"] is True


def test_datajuicer_side_is_skipped_with_a_reason_or_refused_when_named_and_missing(tmp_path, capsys):
    from benchmarks.cpu_bench import (
        add_datajuicer,
        datajuicer_lines,
        find_datajuicer,
        main,
    )

    assert find_datajuicer("none") == (None, "skipped: --datajuicer none")
    python, why = find_datajuicer(str(tmp_path / "nope" / "python"))
    assert python is None and "does not exist" in why and "setup.sh" in why
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    python, why = find_datajuicer(str(tmp_path))  # a venv directory without dj-process
    assert python is None and "no dj-process" in why
    result = {}
    add_datajuicer(result, None, why, "ckpt", tmp_path, tmp_path, 10, {}, 1.0)
    assert result == {"datajuicer": {"skipped": why}}
    assert why in datajuicer_lines(result)
    # Named but missing: a usage error, before any checkpoint is built.
    assert main(["--defaults", "--rows", "4", "--datajuicer", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")]) == 2
    assert "--datajuicer" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_datajuicer_lines_put_it_beside_the_pipeline():
    from benchmarks.cpu_bench import datajuicer_lines

    figures = {"s": 240.5, "pairs_per_s": 0.83, "num_proc": 2, "op_s": 224.5, "versions": {"py-data-juicer": "1.6.1"},
               "pipeline_vs_datajuicer": 1.23, "max_itm_difference_vs_pipeline": 8.9e-08,
               "steady": {"pairs_per_s": 0.96, "first_rows_after_s": 15}, "pipeline_vs_datajuicer_steady": 1.05}
    lines = datajuicer_lines({"datajuicer": figures})
    assert "0.83 pairs/s (240.5 s; py-data-juicer 1.6.1, num_proc 2" in lines
    assert "1.23x" in lines and "8.90e-08" in lines and "1.05x" in lines
    figures["pipeline_vs_datajuicer_steady"] = None  # tuned mode: the pipeline's steady rate is not read
    assert "None" not in datajuicer_lines({"datajuicer": figures})


def test_a_failing_datajuicer_side_is_recorded_not_raised(tmp_path):
    # A "venv" whose dj-process exits 3: the run keeps its other two sides and says what failed.
    from benchmarks.cpu_bench import (
        add_datajuicer,
        datajuicer_lines,
        find_datajuicer,
        write_catalog,
    )

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    for name, script in (("python", "echo 1.6.1 2.13.0+cpu 5.23.0"), ("dj-process", "echo 'config is broken' >&2; exit 3")):
        (venv / name).write_text(f"#!/bin/sh\n{script}\n")
        (venv / name).chmod(0o755)
    python, why = find_datajuicer(str(venv.parent))
    assert python == str(venv / "python") and why is None
    catalog = write_catalog(tmp_path / "catalog", 3, rows_per_group=32)
    result = {}
    add_datajuicer(result, python, None, "ckpt", catalog, tmp_path, 3, {}, 1.0)
    assert "exited 3" in result["datajuicer"]["failed"] and "config is broken" in result["datajuicer"]["failed"]
    assert datajuicer_lines(result).startswith("Data-Juicer ITM filter               : FAILED")


@pytest.mark.skipif(DJ_PYTHON is None, reason=f"Data-Juicer side not tested: {DJ_WHY}")
def test_datajuicer_scores_agree_with_the_hugging_face_loop(tiny_itm, tmp_path):
    """The real thing: dj-process in its venv on a tiny catalog, against the naive HF loop's ITM."""
    from benchmarks.cpu_bench import (
        datajuicer_side,
        itm_difference,
        naive_baseline,
        write_catalog,
    )

    python = DJ_PYTHON
    catalog = write_catalog(tmp_path / "catalog", 6, rows_per_group=32, distinct=True)
    ours, _ = naive_baseline(tiny_itm, catalog, batch_size=4)
    theirs, figures = datajuicer_side(python, tiny_itm, catalog, tmp_path)
    assert theirs.keys() == ours.keys()
    assert itm_difference(ours, theirs) < 1e-6
    assert len({round(v, 4) for v in theirs.values()}) > 1  # the tiny checkpoint's scores differ between rows
    assert figures["num_proc"] >= 1 and figures["s"] > 0 and figures["versions"]["py-data-juicer"]
