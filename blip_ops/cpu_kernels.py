"""oneDNN matrix kernels for the image side of the CPU scorer.

torch's fp32 ``linear`` on the CPU calls MKL's sgemm. On the project's 2-core AMD EPYC (AVX-512),
one core reached 103-107 GFLOP/s through MKL at the vision encoder's four projection shapes
(8 images x 577 tokens against 384->1152, 384->384, 384->1536, 1536->384) and 237-244 GFLOP/s
through oneDNN with the weights prepacked once (``mkldnn::_reorder_linear_weight``, the kernel
torch's own inductor uses on the CPU): MKL does not drive this CPU's AVX-512 units as oneDNN does.
Those projections are about 80% of the vision pass, which is about 80% of a CPU scoring call;
a whole ``BlipScorer.score`` call ran 1.63x faster on 2 chunk workers and took 35% less CPU
(``benchmarks/cpu_kernels.py``, BENCHMARKS.md "oneDNN projections on the CPU").

On an Intel Xeon (family 6, model 167, AVX-512 with AMX) MKL is at home: the same four shapes ran
level on both kernels (torch over oneDNN 0.99-1.05, interleaved, one thread), and three of the four
returned the same bits. So ``auto`` chooses per CPU vendor, from what was measured: oneDNN on AMD,
torch's own kernels on Intel and everywhere else (ARM was not measured).

The same products summed in another order: equal up to float rounding, not bit for bit (drift
measured beside the fused attention's in BENCHMARKS.md). Only the image side is packed: every
Linear of the vision encoder, and the key and value projections of the text encoder's
cross-attention, whose input is the image embeddings. None of them is ever differentiated:
Grad-CAM's backward runs through the text side only (its graph starts at the explained layer's
input and treats the image embeddings as constants), and text-side projections stay torch's, so
a chunk that records its graph for evidence computes the same bits as one that does not.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

CHOICES = ("auto", "onednn", "torch")
# Rows a packed weight is laid out for: one CPU chunk's tokens (8 images x 577 at 384 px). Other
# row counts run on the same packing.
PACKED_FOR_ROWS = 8 * 577


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


# Where ``auto`` takes oneDNN: the x86-64 vendors on which it measured faster than torch's own
# kernels (BLAS). AMD EPYC: 2.3x the GFLOP/s of MKL, a score call 1.63x faster. Intel Xeon: level.
ONEDNN_FASTER_ON = frozenset({"amd"})


def cpu_vendor() -> str:
    """``amd``, ``intel`` or ``other``: the CPU's vendor, from /proc/cpuinfo where there is one
    (Linux, every Ray worker image), else from ``platform.processor()``."""
    text = ""
    try:
        with Path("/proc/cpuinfo").open() as cpuinfo:
            text = next((line for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        pass
    text = (text or platform.processor() or "").lower()
    if "authenticamd" in text or "amd" in text.split():
        return "amd"
    if "genuineintel" in text or "intel" in text:
        return "intel"
    return "other"


def resolve_cpu_kernels(choice: str) -> str:
    """``auto`` is oneDNN on an x86-64 CPU of a vendor where oneDNN measured faster
    (``ONEDNN_FASTER_ON``), and torch's own BLAS elsewhere: on an Intel Xeon they measured level,
    and torch's kernels keep the scores bit for bit transformers' (ARM was not measured);
    ``onednn`` where it cannot run is an error."""
    if choice not in CHOICES:
        raise ValueError(f"cpu_kernels must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "onednn":
        if not onednn_available():
            raise ValueError("cpu_kernels=onednn: this torch build has no oneDNN linear kernels; use cpu_kernels=torch")
        return "onednn"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and cpu_vendor() in ONEDNN_FASTER_ON and onednn_available() else "torch"


class PackedLinear(torch.nn.Module):
    """An inference-only ``nn.Linear`` on oneDNN with its weight prepacked. It keeps no dense
    copy of the weight (BLIP-base's vision encoder would hold 340 MB twice), and refuses an
    input that autograd would differentiate: oneDNN's kernel has no backward, and torch would
    silently give no gradient rather than fail."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Buffers (so a module's memory is still counted by its buffers), not in the state dict: a
        # packed layout is this process's, never a checkpoint's.
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKED_FOR_ROWS), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PackedLinear is inference only: its input requires a gradient")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def _pack_linears(root: torch.nn.Module, wanted) -> int:
    packed = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32 and wanted(full):
                setattr(module, child_name, PackedLinear(child))
                packed += 1
    return packed


def _image_side_of_cross_attention(name: str) -> bool:
    return ".crossattention.self." in f".{name}" and name.rsplit(".", 1)[-1] in ("key", "value")


def pack_image_side(model) -> int:
    """Swap the image-side Linears of a ``BlipForImageTextRetrieval`` (fp32, on the CPU) for
    ``PackedLinear``; returns how many were swapped."""
    return _pack_linears(model.vision_model, lambda name: True) + _pack_linears(
        model.text_encoder, _image_side_of_cross_attention
    )
