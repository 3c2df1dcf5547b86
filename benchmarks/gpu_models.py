"""What the GPU benchmarks share: the full-size model shapes, their FLOP counts, the GPU utilisation
sampler and the clock's synchronisation. A library: ``gpu_bench``, ``gpu_stages`` and ``gpu_levers``
import it, and it imports none of them (``gpu_bench`` and ``gpu_stages`` used to import each other).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading


# --- model shapes --------------------------------------------------------------------------


def itm_config(smoke: bool):
    from blip_ops.tiny import bench_itm_config

    if smoke:
        return bench_itm_config(width=64, depth=1, image_size=64, vocab_size=0)
    return bench_itm_config()  # BLIP-base: ViT-B/16 at 384 px, BERT-base


def blip2_config(smoke: bool, tokenizer, image_token_id: int):
    """``Salesforce/blip2-opt-2.7b``'s shapes (EVA ViT-g/14 at 224 px, Q-Former, OPT-2.7B), or tiny ones."""
    from transformers import Blip2Config

    if smoke:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14)
        qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=32, vocab_size=100)
        text = dict(hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer))
        queries = 4
    else:
        vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224, patch_size=14)
        qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, encoder_hidden_size=1408, vocab_size=30522)
        text = dict(hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272)
        queries = 32
    text.update(
        model_type="opt",
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=dict(qformer, cross_attention_frequency=2),
        text_config=text,
        num_query_tokens=queries,
        image_token_index=image_token_id,
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    return config


def _linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def itm_pair_gflop(config, text_tokens: float) -> float:
    """FLOPs of one ITC+ITM pair with one vision pass, from the shapes (multiply-adds x 2)."""
    v, t = config.vision_config, config.text_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    d, f = v.hidden_size, v.intermediate_size
    vision = _linear_flops(n - 1, 3 * v.patch_size**2, d) + v.num_hidden_layers * (
        _linear_flops(n, d, 4 * d) + _linear_flops(n, d, 2 * f) + 4.0 * n * n * d
    )
    L, dt, ft = text_tokens, t.hidden_size, t.intermediate_size
    self_block = _linear_flops(L, dt, 4 * dt) + 4.0 * L * L * dt + _linear_flops(L, dt, 2 * ft)
    cross = _linear_flops(L, dt, 2 * dt) + _linear_flops(n, t.encoder_hidden_size, 2 * dt) + 4.0 * L * n * dt
    text = t.num_hidden_layers * (2 * self_block + cross)  # unimodal (ITC) + fused (ITM)
    return (vision + text) / 1e9


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def blip2_gflop(model, prompt_tokens: int) -> tuple[float, float]:
    """(GFLOP per image before decoding, GFLOP per generated token), approximated as 2 x params x
    tokens per component plus the Q-Former's cross-attention projections of the image tokens."""
    config = model.config
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + 1
    q = config.num_query_tokens
    lm = model.language_model
    embeddings = _params(lm.get_input_embeddings())
    lm_body = _params(lm) - embeddings
    head = model.get_output_embeddings().weight.numel()
    vision = 2.0 * n * _params(model.vision_model)
    qformer = 2.0 * q * _params(model.qformer)
    cross_layers = -(-config.qformer_config.num_hidden_layers // config.qformer_config.cross_attention_frequency)
    qformer += cross_layers * _linear_flops(n, config.qformer_config.encoder_hidden_size, 2 * config.qformer_config.hidden_size)
    prefill = 2.0 * (q + prompt_tokens) * (lm_body + _params(model.language_projection))
    per_token = 2.0 * (lm_body + head)
    return (vision + qformer + prefill + per_token) / 1e9, per_token / 1e9


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled with nvidia-smi every 0.2 s; None where it cannot be read."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self._enabled = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        self._command = ["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(self._command, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        if self._enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._enabled:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
