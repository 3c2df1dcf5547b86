"""Fused attention (PyTorch SDPA) for BLIP v1's vision encoder.

BLIP v1's ``BlipAttention`` in transformers 5.23 is eager only: it writes the full
``heads x 577 x 577`` score matrix per image at 384 px, and under autocast its softmax
runs in fp32, so at batch 256 each layer moves gigabytes through GPU memory. On an H200
that capped ITC+ITM scoring at about 10% of the arithmetic peak (BENCHMARKS.md).
``scaled_dot_product_attention`` computes the same ``softmax(q k^T * scale) v`` without
materialising the scores. The sum is taken in another order, so the result is equal up to
float rounding, not bit for bit. It is the scorer's default in every precision
(``vision_attention="fused"``): on the CPU in fp32 it cuts the vision pass's CPU time by
about 30% and moved ITM by at most 4.5e-7 and ITC by 1.0e-7 against eager (BENCHMARKS.md);
``vision_attention="eager"`` keeps transformers' own attention, bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
from torch.nn.functional import scaled_dot_product_attention


def _sdpa_forward(self, hidden_states: torch.Tensor, **kwargs):
    # BlipAttention.forward's projections and head layout, with the three attention steps
    # (scores, softmax, weighted sum) fused; dropout is off in eval.
    batch, tokens, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
    context = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None


def _blip_attention_modules(vision_model) -> list:
    from transformers.models.blip.modeling_blip import BlipAttention

    return [module for module in vision_model.modules() if type(module) is BlipAttention]


_lock = threading.Lock()
_holders: dict[int, int] = {}  # id(vision_model) -> blocks currently inside sdpa_vision_attention


@contextlib.contextmanager
def sdpa_vision_attention(vision_model):
    """Within the block, ``vision_model``'s BLIP attention layers run through SDPA.

    The model object is restored when the last block using it exits, so another user of the
    same model (a reference computation, the naive benchmark loop) still gets transformers'
    own eager attention, and two threads scoring with one model never see it switch mid-pass.
    """
    modules = _blip_attention_modules(vision_model)
    key = id(vision_model)
    with _lock:
        if not _holders.get(key):
            for module in modules:
                module.forward = types.MethodType(_sdpa_forward, module)
        _holders[key] = _holders.get(key, 0) + 1
    try:
        yield len(modules)
    finally:
        with _lock:
            _holders[key] -= 1
            if not _holders[key]:
                del _holders[key]
                for module in modules:
                    del module.forward
