"""oneDNN projections on the image side of the CPU scorer (blip_ops.cpu_kernels)."""

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blip_ops import cpu_kernels
from blip_ops.cpu_kernels import PackedLinear, resolve_cpu_kernels
from blip_ops.scorer import BlipScorer

needs_onednn = pytest.mark.skipif(not cpu_kernels.onednn_available(), reason="this torch build has no oneDNN linear")
ONEDNN_LINEAR = "mkldnn._linear_pointwise"


class OpsRan(TorchDispatchMode):
    """Counts the operators torch dispatched inside the block: which kernel ran is proved by the op
    called, never by the numbers differing (on some CPUs, an Intel Xeon with AMX among them, MKL and
    oneDNN return the same bits; on an AMD EPYC they round apart)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_is_torchs_linear_up_to_rounding(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1152, bias=bias)
    x = torch.randn(8, 577, 384)
    packed_linear = PackedLinear(linear)
    with torch.inference_mode():
        with OpsRan() as torch_ops:
            expected = linear(x)
        with OpsRan() as packed_ops:
            packed = packed_linear(x)
    assert packed.shape == expected.shape and packed.dtype == torch.float32
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    # Another kernel indeed: oneDNN's linear ran, and nothing of torch's own.
    assert packed_ops.counts == {ONEDNN_LINEAR: 1}
    assert torch_ops.counts[ONEDNN_LINEAR] == 0 and torch_ops.counts["aten.linear"] == 1
    # A non-contiguous input (a transposed view) gives the same values as its contiguous copy.
    strided = torch.randn(384, 8 * 577).t()
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(strided), linear(strided), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_packed_linear_refuses_an_input_autograd_would_differentiate():
    """oneDNN's kernel has no backward: torch would give no gradient without a word."""
    packed = PackedLinear(torch.nn.Linear(16, 8))
    x = torch.randn(4, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        packed(x)
    with torch.no_grad():
        assert packed(x).shape == (4, 8)
    assert packed(torch.randn(4, 16)).requires_grad is False  # grad on, but nothing to differentiate


@needs_onednn
def test_only_the_image_side_is_packed(tiny_itm):
    scorer = BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="onednn")
    assert scorer.cpu_kernels == "onednn"
    vision = [m for m in scorer.model.vision_model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    assert vision and all(type(m) is PackedLinear for m in vision)
    text_side = list(scorer.model.text_encoder.named_modules())
    packed = {name for name, module in text_side if type(module) is PackedLinear}
    kept = {name for name, module in text_side if type(module) is torch.nn.Linear}
    assert packed and all(name.endswith(("crossattention.self.key", "crossattention.self.value")) for name in packed)
    layers = scorer.model.config.text_config.num_hidden_layers
    assert len(packed) == 2 * layers
    assert any(name.endswith("crossattention.self.query") for name in kept)  # the text side stays torch's
    assert type(scorer.model.vision_proj) is torch.nn.Linear and type(scorer.model.itm_head) is torch.nn.Linear


@needs_onednn
def test_a_score_call_runs_the_packed_layers_on_onednn_and_only_them(tiny_itm):
    """What ran, not what it computed: every oneDNN call of a score call is a packed layer's
    forward, each packed layer ran, and with ``cpu_kernels=torch`` no oneDNN linear runs at all."""
    size = BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="torch").images.height
    images = np.random.default_rng(1).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    texts = ["a red shirt", "a blue car", "a green dog"]
    counts = {}
    for kernels in ("onednn", "torch"):
        scorer = BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels=kernels)
        forwards = collections.Counter()
        for name, module in scorer.model.named_modules():
            if type(module) is PackedLinear:
                module.register_forward_hook(lambda m, i, o, name=name: forwards.update([name]))
        with OpsRan() as ops:
            scorer.score(images, texts)
        counts[kernels] = (ops.counts[ONEDNN_LINEAR], forwards)
    onednn_calls, forwards = counts["onednn"]
    packed_names = {n for n, m in BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="onednn").model.named_modules()
                    if type(m) is PackedLinear}
    assert set(forwards) == packed_names and onednn_calls == sum(forwards.values()) > 0
    assert counts["torch"] == (0, collections.Counter())


def test_torch_kernels_and_other_precisions_leave_the_model_alone(tiny_itm):
    for scorer in (
        BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="torch"),
        BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="bf16"),
        BlipScorer.from_pretrained(tiny_itm, device="cpu", precision="bf16-weights", cpu_kernels="onednn"),
    ):
        assert scorer.cpu_kernels == "torch"
        assert not any(type(m) is PackedLinear for m in scorer.model.modules())
    with pytest.raises(ValueError, match="cpu_kernels"):
        BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="mkl")


@needs_onednn
def test_onednn_scores_are_torchs_up_to_rounding(tiny_itm):
    fast = BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="onednn")
    exact = BlipScorer.from_pretrained(tiny_itm, device="cpu", cpu_kernels="torch")
    size = exact.images.height
    images = np.random.default_rng(5).integers(0, 256, (12, 3, size, size), dtype=np.uint8)
    texts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("shirt", "car", "dog", "cup")]
    itc_fast, itm_fast, _ = fast.score(images, texts)
    itc_exact, itm_exact, _ = exact.score(images, texts)
    assert float(np.ptp(itm_exact)) > 0.05  # the tiny checkpoint is at unit gain: rows differ, a real comparison
    np.testing.assert_allclose(itm_fast, itm_exact, rtol=0, atol=2e-6)
    np.testing.assert_allclose(itc_fast, itc_exact, rtol=0, atol=2e-6)


@pytest.mark.parametrize("vendor_id, vendor", [
    ("vendor_id\t: AuthenticAMD\n", "amd"), ("vendor_id\t: GenuineIntel\n", "intel"), ("vendor_id\t: HygonGenuine\n", "other"), ("", "other"),
])
def test_the_cpu_vendor_is_read_from_cpuinfo(monkeypatch, tmp_path, vendor_id, vendor):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + vendor_id + "model name\t: Some CPU\n")
    real_path = cpu_kernels.Path
    monkeypatch.setattr(cpu_kernels, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.setattr(cpu_kernels.platform, "processor", lambda: "")
    assert cpu_kernels.cpu_vendor() == vendor


def test_auto_is_onednn_on_amd_x86_only_and_an_explicit_onednn_must_be_able_to_run(monkeypatch):
    """auto follows what was measured (BENCHMARKS.md "oneDNN projections on the CPU"): faster on an
    AMD EPYC, level on an Intel Xeon, not measured on ARM. Decided by stubbed machine facts, so the
    outcome is the same on whichever CPU runs the suite."""
    monkeypatch.setattr(cpu_kernels, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "amd")
    assert resolve_cpu_kernels("auto") == "onednn" and resolve_cpu_kernels("torch") == "torch"
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "intel")
    assert resolve_cpu_kernels("auto") == "torch" and resolve_cpu_kernels("onednn") == "onednn"
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "amd")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "arm64")
    assert resolve_cpu_kernels("auto") == "torch" and resolve_cpu_kernels("onednn") == "onednn"
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "onednn_available", lambda: False)
    assert resolve_cpu_kernels("auto") == "torch"
    with pytest.raises(ValueError, match="no oneDNN"):
        resolve_cpu_kernels("onednn")
    with pytest.raises(ValueError, match="one of"):
        resolve_cpu_kernels("fast")
