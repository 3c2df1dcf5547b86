"""Bucketed shapes for compiled models: a ragged batch padded up to one of a few sizes.

A compiled model (``torch.compile``, CUDA graphs) is specialised to the shapes it saw, and
Ray hands the score actor batches of every size: the last batch of a stream, and every batch
with an undecodable image or a blank text, whose rows are not scored. Padding the model
batch up to the next power of two (rows) and the text up to the next multiple of 8 tokens
(capped at the truncation length) bounds the shapes to about log2(batch) x max_tokens / 8
(9 x 5 at the defaults), at a cost of at most half the rows padded and 7 tokens.

Padding rows repeat the last real row and are dropped from the outputs; padding tokens are
masked, so a row's score does not depend on its bucket (tests: equal within float rounding
to the unpadded batch, in fp32 on the CPU).
"""

from __future__ import annotations

TEXT_STEP = 8


def batch_bucket(rows: int) -> int:
    """The next power of two at or above ``rows`` (0 stays 0)."""
    return 0 if rows <= 0 else 1 << (rows - 1).bit_length()


def text_bucket(tokens: int, max_tokens: int) -> int:
    """The next multiple of ``TEXT_STEP`` at or above ``tokens``, at most ``max_tokens`` (the truncation length)."""
    return min(max_tokens, -(-tokens // TEXT_STEP) * TEXT_STEP)


def pad_rows(tensor, rows: int):
    """``tensor`` with its last row repeated up to ``rows`` rows."""
    import torch

    extra = rows - len(tensor)
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])], dim=0)


def pad_tokens(input_ids, attention_mask, length: int, pad_id: int):
    """Token ids and mask padded on the right to ``length`` (pad id, mask 0)."""
    from torch.nn.functional import pad

    extra = length - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask
    return pad(input_ids, (0, extra), value=pad_id), pad(attention_mask, (0, extra), value=0)
