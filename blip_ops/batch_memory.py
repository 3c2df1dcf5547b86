"""How many images a caption call can take, from the card's free memory.

A fixed caption batch (256) either leaves most of an H200 idle (512 ran 12% faster there) or
runs a 24 GB card out of memory. The memory a BLIP-2 ``generate`` call needs grows linearly with
its rows, and per row it is dominated by the language model's KV cache, ``2 x layers x tokens x
hidden`` values (OPT-2.7B at 62 tokens: 20 MB in bf16), plus the activations of the widest layer
live at once: the vision encoder's (ViT-g: 257 tokens x (5 x 1408 + 6144) values, and its
attention scores), the language model's prefill, and the logits. ``caption_rows`` divides the
free memory, less a reserve for the allocator and workspaces, by that estimate and rounds down
to a power of two, capped at ``CAPTION_ROWS_MAX``. Pure arithmetic, no torch: the caption actor
asks the card (``torch.cuda.mem_get_info``) after its models have loaded. The estimate errs
high; an out-of-memory still halves the call (``blip_ops.oom``).
"""

from __future__ import annotations

from dataclasses import dataclass

# The largest caption batch measured (H200: 408 captions/s at 512, 363 at 256; BENCHMARKS.md).
CAPTION_ROWS_MAX = 512
# Kept free beside the estimate: the caching allocator's fragmentation, cuBLAS workspaces.
RESERVE_BYTES = 1 << 30
USABLE_FRACTION = 0.8


@dataclass(frozen=True)
class CaptionDims:
    vision_tokens: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    query_tokens: int
    qformer_hidden: int
    qformer_intermediate: int
    qformer_heads: int
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "CaptionDims":
        """From a ``Blip2Config`` (any object with its attributes)."""
        vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
        text_intermediate = getattr(text, "ffn_dim", None) or getattr(text, "intermediate_size")
        return cls(
            vision_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_heads=vision.num_attention_heads,
            query_tokens=config.num_query_tokens,
            qformer_hidden=qformer.hidden_size,
            qformer_intermediate=qformer.intermediate_size,
            qformer_heads=qformer.num_attention_heads,
            text_layers=text.num_hidden_layers,
            text_hidden=text.hidden_size,
            text_intermediate=text_intermediate,
            text_heads=text.num_attention_heads,
            vocab=text.vocab_size,
        )


def activation_bytes(precision: str) -> int:
    """Bytes per activation value: 4 in fp32, 2 in the half types (autocast or bf16 weights)."""
    return 4 if precision == "fp32" else 2


def _layer_values(tokens: int, hidden: int, intermediate: int, heads: int, key_tokens: int | None = None) -> int:
    # Input, output and q/k/v of a layer (5 x hidden), its MLP's intermediate, and its attention scores.
    return tokens * (5 * hidden + intermediate) + heads * tokens * (key_tokens or tokens)


def bytes_per_row(dims: CaptionDims, prompt_tokens: int, max_new_tokens: int, precision: str) -> int:
    """Estimated GPU bytes one image adds to a ``generate`` call (greedy, KV cache)."""
    size = activation_bytes(precision)
    tokens = dims.query_tokens + prompt_tokens + max_new_tokens + 1  # + BOS
    kv_cache = 2 * dims.text_layers * tokens * dims.text_hidden * size
    widest = max(
        _layer_values(dims.vision_tokens, dims.vision_hidden, dims.vision_intermediate, dims.vision_heads),
        _layer_values(dims.query_tokens, dims.qformer_hidden, dims.qformer_intermediate, dims.qformer_heads,
                      key_tokens=dims.vision_tokens),
        _layer_values(tokens, dims.text_hidden, dims.text_intermediate, dims.text_heads),
    ) * size
    vision_states = 2 * dims.vision_tokens * dims.vision_hidden * size  # kept for the Q-Former's cross-attention
    logits = 2 * dims.vocab * 4  # the last position's logits and scores, in fp32
    return kv_cache + widest + vision_states + logits


def caption_rows(free_bytes: int, dims: CaptionDims, prompt_tokens: int, max_new_tokens: int, precision: str,
                 cap: int = CAPTION_ROWS_MAX) -> int:
    """Rows per caption call that fit ``free_bytes``: a power of two from 1 to ``cap``."""
    usable = (free_bytes - RESERVE_BYTES) * USABLE_FRACTION
    fits = int(usable // bytes_per_row(dims, prompt_tokens, max_new_tokens, precision))
    if fits < 1:
        return 1
    return min(cap, 1 << (fits.bit_length() - 1))
