"""The labels benchmark's code paths at tiny shapes, so the script cannot rot unnoticed."""

import json

from benchmarks import labels_bench


def test_smoke_run_reports_every_step(capsys):
    assert labels_bench.main(["--smoke", "--batch-size", "6", "--names", "20", "--batches", "1", "--unshared", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    steps = {"none", "labels_1k", "labels_1k_gated", "labels_1k_per_row", "labels_1k_unshared", "labels_10k"}
    assert set(result["s_per_batch"]) == steps and all(v > 0 for v in result["s_per_batch"].values())
    assert result["cost_vs_none"]["none"] == 1.0 and set(result["label_pass_s"]) == {"1k", "10k"}
    assert result["names"] == {"1k": 20, "10k": 200} and len(result["itc_gates_1k_gated"]) == 5
    assert result["memory"]["10k"]["text_features_mb"] > result["memory"]["1k"]["text_features_mb"]
    assert result["load_average_before"] and result["command"].startswith("python -m benchmarks.labels_bench")
