"""The oneDNN kernels benchmark runs, and reports the drift the README quotes the bound of."""

import json

import pytest

from benchmarks import cpu_kernels as bench
from blip_ops.cpu_kernels import onednn_available


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")
def test_smoke_reports_drift_gemm_and_time(tmp_path, capsys):
    bench.main(["--smoke", "--workdir", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 8 and result["checkpoint"] == "tiny"
    low, high = result["itm_range"]
    assert high - low > 0.05  # spread scores: a drift figure over constant outputs would mean nothing
    for name in ("onednn_vs_torch", "fused_attention_vs_eager", "onednn_and_fused_vs_eager"):
        assert 0 <= result["drift"][name]["itm"] < 1e-5 and 0 <= result["drift"][name]["itc"] < 1e-5
    assert result["gemm_one_thread"][0]["torch_gflops"] > 0 and result["gemm_one_thread"][0]["onednn_gflops"] > 0
    assert set(result["median"]) == {f"score_{kind}_s_{side}" for kind in ("cpu", "wall") for side in ("torch", "onednn")}


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")
def test_gemm_only_times_the_two_kernels_call_by_call(capsys):
    bench.main(["--gemm-only", "--gemm-repeats", "2"])
    result = json.loads(capsys.readouterr().out)
    assert [row["shape"] for row in result["gemm_one_thread"]] == [f"4616x{w} @ {w}x{o}" for w, o in bench.SHAPES]
    for row in result["gemm_one_thread"]:
        assert row["torch_gflops"] > 0 and row["onednn_gflops"] > 0 and row["torch_over_onednn_median"] > 0
        assert isinstance(row["same_bits"], bool)
