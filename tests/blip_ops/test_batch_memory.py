"""The caption batch from the card's free memory: a pure estimate, and where the actor applies it."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from blip_ops.batch_memory import CAPTION_ROWS_MAX, CaptionDims, bytes_per_row, caption_rows

GIB = 1 << 30

# Salesforce/blip2-opt-2.7b's layout (its config.json): ViT-g at 224 px, a BERT-base Q-Former, OPT-2.7B.
OPT_2_7B = NS(
    vision_config=NS(image_size=224, patch_size=14, hidden_size=1408, intermediate_size=6144, num_attention_heads=16),
    qformer_config=NS(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    num_query_tokens=32,
    text_config=NS(num_hidden_layers=32, hidden_size=2560, ffn_dim=10240, num_attention_heads=32, vocab_size=50272),
)


def test_a_row_of_opt_2_7b_is_about_the_kv_cache_plus_the_widest_layer():
    dims = CaptionDims.from_config(OPT_2_7B)
    assert dims.vision_tokens == 257 and dims.text_intermediate == 10240
    half = bytes_per_row(dims, prompt_tokens=0, max_new_tokens=30, precision="bf16")
    kv_cache = 2 * 32 * (32 + 30 + 1) * 2560 * 2  # 20.6 MB
    assert kv_cache < half < 2 * kv_cache
    assert bytes_per_row(dims, 0, 30, "fp32") == pytest.approx(2 * half, rel=0.01)
    assert bytes_per_row(dims, 10, 30, "bf16") > half  # a prompt adds tokens to every row


@pytest.mark.parametrize("free_gib, precision, rows", [
    (125, "bf16", CAPTION_ROWS_MAX),  # an H200 after loading: the cap, the best size measured
    (8, "bf16", 128),  # a 24 GB card with 2.7B's fp32 weights loaded
    (8, "fp32", 64),
    (4, "bf16", 64),
    (1.2, "bf16", 4),
    (0.5, "bf16", 1),  # never 0: one row that does not fit is the out-of-memory handler's to report
])
def test_rows_fit_the_free_memory_as_a_power_of_two(free_gib, precision, rows):
    assert caption_rows(int(free_gib * GIB), CaptionDims.from_config(OPT_2_7B), 0, 30, precision) == rows


def test_rows_never_exceed_the_cap_and_grow_with_memory():
    dims = CaptionDims.from_config(OPT_2_7B)
    sizes = [caption_rows(gib * GIB, dims, 0, 30, "bf16", cap=256) for gib in range(1, 40)]
    assert sizes == sorted(sizes) and max(sizes) == 256


def test_the_tiny_checkpoint_reads_and_the_caption_stage_uses_it_only_on_cuda(tiny_caption, monkeypatch):
    import torch

    from pipelines.dataflow.stages import CaptionStage

    stage = CaptionStage(model=tiny_caption, device="cpu", max_new_tokens=4, prompt=None, policy="all",
                         rows_from_memory=512)
    assert stage.parts.rows_per_call is None  # the CPU: Ray's batch as it comes, as before
    captioner = stage.captioner
    dims = CaptionDims.from_config(captioner.model.config)
    monkeypatch.setattr(captioner, "device", "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 80 * GIB))
    assert captioner.rows_for_memory(8) == 8
    assert captioner.rows_for_memory(4096) == caption_rows(2 * GIB, dims, 0, 4, captioner.precision, cap=4096)
