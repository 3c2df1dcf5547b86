"""Precision: ``auto`` keeps the CPU in fp32 (the fidelity reference); bf16/fp16 are autocast."""

import pytest
import torch

from blip_ops.precision import autocast, resolve_precision


def test_auto_is_fp32_on_cpu():
    assert resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_half_precision(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert resolve_precision("auto", "cuda") == expected
    assert resolve_precision("auto", "cuda:0") == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept_on_any_device(precision):
    assert resolve_precision(precision, "cpu") == precision
    assert resolve_precision(precision, "cuda") == precision


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_matmuls_at_the_precision(precision, dtype):
    layer = torch.nn.Linear(4, 4)
    with torch.inference_mode(), autocast(precision, "cpu"):
        assert layer(torch.randn(2, 4)).dtype == dtype
