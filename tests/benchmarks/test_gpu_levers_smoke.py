"""benchmarks.gpu_levers runs end to end on tiny shapes (its figures come from a GPU machine)."""

import json


def test_every_step_runs_and_reports(capsys):
    from benchmarks import gpu_levers

    assert gpu_levers.main(["--smoke", "--json", "--tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["smoke"] is True and result["device"] == "cpu"
    assert {"score_calls_1", "score_calls_2", "caption_calls_1", "caption_calls_2"} <= set(result["overlap"])
    assert result["bf16_weights"]["bf16-weights"]["weight_bytes"] * 2 == result["bf16_weights"]["fp32"]["weight_bytes"]
    assert result["buckets"]["compiled"].startswith("skipped") and "pairs_per_s" in result["buckets"]["buckets"]
    assert result["caption_rows"]["rows_for_memory"] is None  # no CUDA: the stage keeps Ray's batch
