"""The GPU benchmark's code paths, at tiny shapes on the CPU, so the script cannot rot unnoticed."""

import json

import pytest

from benchmarks import gpu_bench


def test_smoke_run_reports_every_figure(capsys):
    assert gpu_bench.main(["--smoke", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["smoke"] is True and result["environment"]["device"] == "cpu"
    scoring, captioning = result["scoring"], result["captioning"]
    for section, unit in ((scoring, "pairs"), (captioning, "captions")):
        assert section[f"{unit}_per_s"] > 0 and section[f"naive_{unit}_per_s"] > 0
        assert section["ratio"] == pytest.approx(section[f"{unit}_per_s"] / section[f"naive_{unit}_per_s"], rel=0.02)
        assert section["precision"] == "fp32"  # auto on the CPU
        assert section["gpu_util_percent"] is None  # no GPU: not made up
    # fp32 on both sides: the one-pass scorer and the two-call loop agree, and so do the captions.
    assert scoring["max_score_difference_vs_naive"] < 1e-4
    assert captioning["captions_equal_to_naive"] == 1.0
    assert scoring["decode_resize_images_per_s"] > 0


def test_flop_counts_match_the_issues_estimates_at_full_size():
    """Counted from BLIP-base's and BLIP-2 OPT-2.7B's shapes (no weights allocated)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip_ops.tiny import _opt_tokenizer

    assert gpu_bench.itm_pair_gflop(gpu_bench.itm_config(smoke=False), text_tokens=35) == pytest.approx(141, rel=0.02)
    tokenizer = _opt_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = gpu_bench.blip2_config(False, tokenizer, tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.745e9, rel=0.01)
    per_image, per_token = gpu_bench.blip2_gflop(model, prompt_tokens=0)
    assert per_image == pytest.approx(700, rel=0.05) and per_token == pytest.approx(5.3, rel=0.02)


@pytest.mark.parametrize("skip, kept", [("--skip-captions", "scoring"), ("--skip-scoring", "captioning")])
def test_each_workload_runs_alone(capsys, skip, kept):
    """The GPU machine runs them as two processes, so a failure in one still returns the other."""
    assert gpu_bench.main(["--smoke", "--device", "cpu", "--json", skip]) == 0
    result = json.loads(capsys.readouterr().out)
    assert kept in result and ({"scoring", "captioning"} - {kept}).isdisjoint(result)


def test_this_side_alone_with_a_static_cache_and_batch_size_sweeps(capsys):
    """The options the GPU run uses to find the best batch sizes and to try the compiled static cache."""
    argv = ["--smoke", "--device", "cpu", "--json", "--skip-naive", "--cache", "static"]
    argv += ["--sweep-score-batch-sizes", "4,16", "--sweep-caption-batch-sizes", "2", "--decode-processes", "1"]
    assert gpu_bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    scoring, captioning = result["scoring"], result["captioning"]
    assert "ratio" not in scoring and "naive_pairs_per_s" not in scoring
    assert "ratio" not in captioning and captioning["cache"] == "static"
    assert set(scoring["batch_size_sweep"]) == {"4", "16"} and set(captioning["batch_size_sweep"]) == {"2"}
    assert all(entry["pairs_per_s"] > 0 for entry in scoring["batch_size_sweep"].values())
    assert captioning["batch_size_sweep"]["2"]["captions_per_s"] > 0
    assert scoring["warmup_seconds"] >= 0 and captioning["warmup_seconds"] >= 0
    assert scoring["decode_processes"] == 1 and scoring["decode_resize_images_per_s_processes"] > 0


def test_decode_only_reports_thread_and_process_rates_without_models(capsys):
    assert gpu_bench.main(["--smoke", "--device", "cpu", "--json", "--decode-only", "--decode-processes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "scoring" not in result and "captioning" not in result
    decoding = result["decoding"]
    assert decoding["images_per_s_threads"] > 0
    assert set(decoding["images_per_s_processes"]) == {"1", "2"} and all(r > 0 for r in decoding["images_per_s_processes"].values())


def test_stages_as_the_job_runs_them_with_both_decode_devices(capsys):
    """--stages: Parquet bytes through decode_batch, ScoreStage, flag_batch and CaptionStage, once per
    decode device, and the device JPEG decoder alone (the Pillow stand-in where torchvision is missing)."""
    assert gpu_bench.main(["--smoke", "--device", "cpu", "--json", "--stages-only"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "scoring" not in result and "captioning" not in result
    stages = result["stages"]
    assert stages["jpeg_backend"] in ("torchvision", "pil")
    for mode in ("cpu", "gpu"):
        section = stages[f"decode_{mode}"]
        assert section["pairs_per_s"] > 0 and section["captions_per_s"] > 0
        assert section["pairs_scored"] == section["pairs_measured"] == 16  # every photo row scored
        assert section["captions_made"] == 4 and section["gpu_util_percent"] is None
        assert section["decode_task_cpu_s_per_1000_rows"] > 0 and section["score_actor_host_cpu_s_per_1000_rows"] > 0
        assert section["decode_cores_per_gpu_at_this_rate"] == pytest.approx(
            section["decode_task_cpu_s_per_1000_rows"] / 1000 * section["pairs_per_s"], abs=0.01
        )
    cpu, gpu = stages["decode_cpu"], stages["decode_gpu"]
    assert cpu["score_actor_jpeg_rows"] is None
    # With device decoding the decode tasks only read headers, and the actors decode every JPEG themselves.
    assert gpu["decode_task_cpu_s_per_1000_rows"] < cpu["decode_task_cpu_s_per_1000_rows"] / 3
    assert gpu["score_actor_jpeg_rows"] == {"on_device": 24, "fell_back": 0, "failed": 0}
    assert gpu["caption_actor_jpeg_rows"]["on_device"] == 8
    decode = stages["device_jpeg_decode"]
    assert decode["images_per_s"] > 0 and decode["on_device"] == decode["batch"] and decode["mean_abs_levels_vs_pillow"] < 1
