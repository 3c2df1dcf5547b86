"""Numeric precision for the model operators: fp32, or bf16/fp16 autocast.

Weights stay in fp32 and ``torch.autocast`` runs matrix multiplications and attention in
the half type while keeping softmax, layer norm and reductions in fp32. That is the
cheap half of the speed-up on a GPU (tensor cores) at a bounded cost in fidelity; the
scores the fidelity tests pin down are the fp32 ones, which ``auto`` keeps on the CPU.
In half precision the scorer also fuses BLIP's vision attention (``blip_ops.attention``).

``bf16-weights`` is the other half: the weights themselves are stored in bf16 and no autocast
runs, so every operation, layer norm and softmax included, is bf16, and the weights take half
the memory with no per-call casts. It moves scores further than autocast (BENCHMARKS.md,
"bf16 weights") and is never chosen by ``auto``.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-weights")
BF16_WEIGHTS = "bf16-weights"
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


def weight_dtype(precision: str):
    """The dtype weights are loaded in: bf16 for ``bf16-weights``, else fp32 (autocast casts per call)."""
    return torch.bfloat16 if precision == BF16_WEIGHTS else torch.float32


def autocast(precision: str, device: str):
    """A context running the model at ``precision`` (already resolved) on ``device``."""
    if precision in ("fp32", BF16_WEIGHTS):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_HALF[precision])
