"""The fp32 attention benchmark runs, and its drift figure is the one the README quotes the bound of."""

import json

from benchmarks import attention_fp32


def test_smoke_reports_drift_and_cpu_seconds(tmp_path, capsys):
    attention_fp32.main(["--smoke", "--workdir", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 8 and result["checkpoint"] == "tiny"
    low, high = result["itm_range"]
    assert high - low > 0.05  # spread scores: a drift figure over constant outputs would mean nothing
    assert 0 <= result["drift_fused_vs_eager"]["itm"] < 1e-5 and 0 <= result["drift_fused_vs_eager"]["itc"] < 1e-5
    assert set(result["cpu_s_per_batch_median"]) == {"vision_eager", "vision_fused", "score_eager", "score_fused"}
