"""Numeric precision for the model operators: fp32, or bf16/fp16 autocast.

Weights stay in fp32 and ``torch.autocast`` runs matrix multiplications and attention in
the half type while keeping softmax, layer norm and reductions in fp32. That is the
cheap half of the speed-up on a GPU (tensor cores) at a bounded cost in fidelity; the
scores the fidelity tests pin down are the fp32 ones, which ``auto`` keeps on the CPU.
In half precision the scorer also fuses BLIP's vision attention (``blip_ops.attention``).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is bf16 on CUDA (fp16 on GPUs without bf16) and fp32 elsewhere; others are kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: str):
    """A context running the model at ``precision`` (already resolved) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_HALF[precision])
