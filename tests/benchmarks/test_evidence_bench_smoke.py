"""The evidence benchmark's code paths at tiny shapes, so the script cannot rot unnoticed."""

import json

from benchmarks import evidence_bench


def test_smoke_run_reports_every_policy(capsys):
    assert evidence_bench.main(["--smoke", "--batch-size", "10", "--batches", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    policies = {"none", "flagged", "flagged_itc", "all", "all_after_itm", "flagged_full_pass", "all_full_pass"}
    assert set(result["pairs_per_s"]) == policies and all(v > 0 for v in result["pairs_per_s"].values())
    assert set(result["evidence_s_per_batch"]) == policies - {"none"} and all(v > 0 for v in result["evidence_s_per_batch"].values())
    assert result["cost_vs_none"]["none"] == 1.0 and result["layout"]["explained_layer"] == 0
    assert result["precision"] == "fp32" and result["load_average_before"] and result["command"].startswith("python -m")
