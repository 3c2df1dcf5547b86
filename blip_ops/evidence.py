"""Grad-CAM evidence for the ITM score: where in the image the text's words land.

This is LAVIS's ``compute_gradcam`` (``blip_image_text_matching.py``) applied to the
transformers ``BlipForImageTextRetrieval`` exactly as the scorer runs it: [CLS] first, not
LAVIS's [ENC] swap, so the map explains the very ITM score in the row. At one cross-attention
layer of the ITM text encoder, the attention probabilities (image [CLS] key dropped) are
multiplied by their gradient with respect to the positive ITM logit, clamped at 0; the product
is averaged over heads, then over the text's word tokens (not [CLS], [SEP] or padding).

The non-obvious decision: the map comes out of the scoring pass, not a pass of its own. The text
encoder's hidden state entering layer ``L`` is made the graph's only leaf (weights frozen), so the
backward stops at ``L``'s attention. In fp32 the scoring ITM pass keeps what entered ``L`` (the
hidden state and the masks as transformers built them: ``capturing``), so a map costs the layers
from ``L`` up and a backward (``explain_from``); and where most of a chunk's rows are wanted before
the ITM pass is run (flagged by ITC, or ``--evidence all``: ``Wanted.from_itc``), that chunk's ITM
pass itself records the graph from ``L`` up (``recording``: the same kernels, scores bit for bit
unchanged), so its maps cost the backward alone. The image embeddings are the scoring pass's in
every case, so no vision pass is repeated. On BLIP-base's layout at width 384, depth 6, 384 px,
64-row CPU batches at 1 and 2 threads: explaining every row adds 4-5% to the score call (it was
19-21% with a full text-encoder forward per row), every row flagged by ITM only 15-17%, and a 10%
ITM flag rate 1-3% (BENCHMARKS.md, "Grad-CAM evidence cost"). Half precision and bf16 weights score in
another dtype, so there evidence runs its own fp32 text-encoder pass (``explain``), as before:
gradients are fp32 whatever the scoring precision, so half precision cannot underflow them.
torch is imported where the map is computed, so preflight can check a layer (``check_layer``)
without it.
"""

from __future__ import annotations

import contextlib
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

TOP_WORDS = 5
# LAVIS's demo explains layer 6 of BLIP-base's 12-layer text encoder; other depths use the middle.
LAVIS_LAYERS, LAVIS_LAYER = 12, 6


def default_layer(text_layers: int) -> int:
    # (n - 1) // 2 rather than n // 2, so a 2-layer encoder is not explained at its last layer.
    return LAVIS_LAYER if text_layers == LAVIS_LAYERS else (text_layers - 1) // 2


def check_layer(layer: int | None, text_layers: int) -> int:
    """The layer to explain: ``layer``, or the default for this depth; raises ``ValueError`` if unusable.

    The last layer is refused: inside a layer self-attention comes before cross-attention, so at
    the last layer a word token's cross-attention never reaches the [CLS] state the ITM head reads,
    and every word's map is identically zero.
    """
    if layer is None:
        return default_layer(text_layers)
    if not 0 <= layer < text_layers - 1:
        raise ValueError(
            f"evidence layer {layer} cannot be explained: the ITM text encoder has layers 0..{text_layers - 1}, "
            f"and the last one ({text_layers - 1}) gives all-zero maps (its words' cross-attention never reaches [CLS])"
        )
    return layer


@dataclass
class Evidence:
    """One row's map: ``heat`` is the raw Grad-CAM over the ``rows x cols`` patch grid, row-major."""

    rows: int
    cols: int
    heat: np.ndarray
    layer: int
    words: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "cols": self.cols,
            "heat": self.heat.astype(np.float32).tolist(),
            "words": [{"word": word, "weight": float(weight)} for word, weight in self.words],
            "layer": self.layer,
        }


def torch_float32():
    import torch

    return torch.float32


def _is_punctuation(word: str) -> bool:
    return all(ch in string.punctuation for ch in word)


def top_words(tokens: list[str], weights: np.ndarray, skip: set[str], limit: int = TOP_WORDS) -> list[tuple[str, float]]:
    """WordPiece pieces (``##``) merged back into words, each weighted by the total of its pieces'
    maps; the ``limit`` heaviest, descending (ties in text order). Punctuation and special tokens
    such as [UNK] still count in the map but are not words a reviewer reads."""
    words: list[list] = []
    for token, weight in zip(tokens, weights):
        if token.startswith("##") and words:
            words[-1][0] += token[2:]
            words[-1][1] += float(weight)
        else:
            words.append([token, float(weight)])
    kept = [(w, v) for w, v in words if w not in skip and not _is_punctuation(w)]
    order = sorted(range(len(kept)), key=lambda i: (-kept[i][1], i))
    return [kept[i] for i in order[:limit]]


class GradCam:
    """Evidence for rows the scorer has already embedded: ``explain(image_embeds, input_ids, attention_mask)``.

    ``reuse_scoring_pass=False`` makes every map come from ``explain``'s own fp32 text-encoder pass
    even where the scoring pass could serve (fp32, eager): the path half precision and bf16 weights
    always take, so CUDA's default (``auto`` is bf16 there). It exists so that path can be compared
    with the LAVIS port in fp32 on a CPU, and timed against the scoring-pass paths; the maps are the
    same either way, up to fp32 rounding."""

    def __init__(self, model, tokenizer, layer: int | None = None, reuse_scoring_pass: bool = True):
        text_layers = model.config.text_config.num_hidden_layers
        self.layer = check_layer(layer, text_layers)
        self.reuse_scoring_pass = reuse_scoring_pass
        vision = model.config.vision_config
        self.rows = self.cols = vision.image_size // vision.patch_size
        self.tokenizer = tokenizer
        self.skip = set(tokenizer.all_special_tokens)
        self.text_encoder, self.itm_head = model.text_encoder, model.itm_head
        if next(model.text_encoder.parameters()).dtype != torch_float32():
            # bf16 weights (precision bf16-weights): the backward pass keeps its fp32 promise on an
            # fp32 copy of the text encoder and ITM head (BLIP-base: 0.5 GB), not on the scoring weights.
            import copy

            self.text_encoder = copy.deepcopy(model.text_encoder).float().requires_grad_(False)
            self.itm_head = copy.deepcopy(model.itm_head).float().requires_grad_(False)
        self.block = self.text_encoder.encoder.layer[self.layer]
        # Inference only: with frozen weights the one leaf is the hidden state entering the layer.
        model.requires_grad_(False)
        # The hooks stay on the shared model and act only on a pass this object started in the calling
        # thread: the scorer runs chunks on several threads at once (BlipScorer.chunk_workers), and a
        # hook put on or taken off while another thread's pass iterates the hooks would break it.
        self._local = threading.local()
        self.block.register_forward_pre_hook(self._entering, with_kwargs=True)
        self.block.crossattention.self.register_forward_hook(self._attended)

    @contextlib.contextmanager
    def _pass(self, kept: list | None = None, leaf: bool = False):
        """This thread's passes through the explained layer, within the block: append what enters it
        to ``kept`` (a list, or None), make the entering hidden state the graph's ``leaf``; the
        attention probabilities are kept either way (``_Pass.probs``)."""
        outer = getattr(self._local, "current", None)
        current = _Pass(kept, leaf)
        self._local.current = current
        try:
            yield current
        finally:
            self._local.current = outer

    def _entering(self, module, args, kwargs):
        current = getattr(self._local, "current", None)
        if current is None or not (len(args) == 2 and args[1] is not None):  # the unimodal pass has no image
            return None
        if current.kept is not None:
            current.kept.append(LayerInput(args[0], args[1], dict(kwargs)))
        if current.leaf:
            return (args[0].detach().requires_grad_(True), args[1]), kwargs
        return None

    def _attended(self, module, args, output):
        current = getattr(self._local, "current", None)
        if current is not None:
            current.probs = output[1]

    def explain(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Evidence]:
        if not len(input_ids):
            return []
        probs, grads = self._attention_and_gradient(image_embeds, input_ids, attention_mask)
        return self._maps(probs, grads, input_ids, attention_mask)

    @contextlib.contextmanager
    def capturing(self):
        """Within it, every cross-attending pass this thread makes through the explained layer is kept
        (a ``LayerInput`` appended to the list it yields): references only, nothing is copied."""
        with self._pass(kept=[]) as current:
            yield current.kept

    def explain_from(self, entered: LayerInput, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Evidence]:
        """``explain`` for rows whose scoring pass already ran the layers below the explained one:
        ``entered`` is what entered it (``LayerInput.take``: these rows, cut to ``input_ids``'s width).
        Only the layers from the explained one up and the ITM head run, in the scoring pass's fp32."""
        if not len(input_ids):
            return []
        probs, grads = self._gradient_from(entered)
        return self._maps(probs, grads, input_ids, attention_mask)

    @contextlib.contextmanager
    def recording(self):
        """Within it (grad enabled), a cross-attending pass this thread makes through the text encoder
        records its graph from the explained layer up, the hidden state entering that layer the leaf;
        yields what ``explain_recorded`` reads the attention probabilities from. What enters the layer
        is still kept for an enclosing ``capturing``."""
        outer = getattr(self._local, "current", None)
        with self._pass(kept=outer.kept if outer is not None else None, leaf=True) as current:
            yield current

    def explain_recorded(self, logit: torch.Tensor, seen: _Pass, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Evidence]:
        """``explain`` for every row of a pass recorded under ``recording``: only the backward runs.
        ``logit`` is that pass's positive ITM logit."""
        return self._maps(*_backward(logit, seen.probs), input_ids, attention_mask)

    def _maps(self, probs, grads, input_ids, attention_mask) -> list[Evidence]:
        import torch

        patches = probs.shape[-1] - 1
        if patches != self.rows * self.cols:
            raise ValueError(f"{patches} image patches, expected a {self.rows}x{self.cols} grid")
        cam = (probs[..., 1:] * grads[..., 1:].clamp(min=0)).mean(dim=1)  # (batch, tokens, patches)
        words = attention_mask.clone()
        words[:, 0] = 0  # [CLS]
        words[torch.arange(len(words)), attention_mask.sum(dim=1) - 1] = 0  # [SEP], the last real token
        words = words.to(cam.dtype)
        heat = (cam * words[..., None]).sum(dim=1) / words.sum(dim=1).clamp(min=1)[:, None]
        token_weights = (cam.sum(dim=-1) * words).cpu().numpy()
        heat = heat.cpu().numpy().astype(np.float32)
        ids = input_ids.cpu().numpy()
        mask = words.cpu().numpy().astype(bool)
        out = []
        for row in range(len(ids)):
            tokens = self.tokenizer.convert_ids_to_tokens(ids[row][mask[row]].tolist())
            out.append(Evidence(self.rows, self.cols, heat[row], self.layer,
                                top_words(tokens, token_weights[row][mask[row]], self.skip)))
        return out

    def _attention_and_gradient(self, image_embeds, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        # fp32 whatever the scoring precision: no autocast, and the embeddings cast up.
        with self._pass(leaf=True) as current, torch.enable_grad(), torch.autocast(image_embeds.device.type, enabled=False):
            embeds = image_embeds.detach().float().clone()  # a normal tensor, also from inference mode
            fused = self.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
            ).last_hidden_state
            return _backward(self.itm_head(fused[:, 0, :])[:, 1], current.probs)

    def _gradient_from(self, entered: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        with self._pass() as current, torch.enable_grad():
            hidden = entered.hidden.requires_grad_(True)  # the leaf, as in _attention_and_gradient
            # The remaining layers called as BlipTextEncoder.forward calls them.
            for layer in self.text_encoder.encoder.layer[self.layer :]:
                hidden = layer(hidden, entered.encoder_hidden, **entered.kwargs)
            return _backward(self.itm_head(hidden[:, 0, :])[:, 1], current.probs)


def _backward(logit: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention probabilities and their gradient with respect to the positive ITM logit (rows
    are independent, so the sum's gradient is each row's own)."""
    import torch

    with torch.enable_grad():
        (grads,) = torch.autograd.grad(logit.sum(), probs)
    return probs.detach(), grads


@dataclass
class _Pass:
    """One thread's pass through the explained layer (``GradCam._pass``)."""

    kept: list | None
    leaf: bool
    probs: object = None


@dataclass(frozen=True)
class Wanted:
    """Which rows of a batch get evidence: ``rule(itc, itm)``, a bool mask over the batch.
    ``from_itc(itc)``, where given, marks the rows wanted whatever their ITM, row by row (ITC
    flags, or every row): the scorer knows them before the ITM pass and may record that pass's
    graph for them. It only chooses how a map is computed; the rows explained are ``rule``'s."""

    rule: Callable[[np.ndarray, np.ndarray], np.ndarray]
    from_itc: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, itc: np.ndarray, itm: np.ndarray) -> np.ndarray:
        return self.rule(itc, itm)


# Masks BlipTextModel builds for the encoder, and the dimensions of theirs that run over the text.
_TEXT_DIMS = {"attention_mask": (-2, -1), "encoder_attention_mask": (-2,)}


@dataclass
class LayerInput:
    """What entered the explained layer in a scoring pass, as ``BlipTextEncoder.forward`` passed it:
    the hidden state, the image embeddings, and the keyword arguments (the attention masks exactly as
    transformers built them: 4D float, or None)."""

    hidden: torch.Tensor  # (rows, tokens, width)
    encoder_hidden: torch.Tensor
    kwargs: dict

    @staticmethod
    def join(parts: list[LayerInput], encoder_hidden: torch.Tensor) -> LayerInput:
        """One ``LayerInput`` for a batch scored in chunks (rows in chunk order); ``encoder_hidden``
        is the batch's image embeddings, the chunks' own joined already."""
        import torch

        if len(parts) == 1:
            return parts[0]

        def rows(value, like, count):
            # A mask broadcast over rows (first dimension 1) made explicit. None is a chunk transformers
            # found nothing to mask in (no padding) while another chunk has some: the same as a mask
            # that masks nothing, which is what it becomes (additive 0, or boolean True).
            if value is None:
                value = torch.zeros_like(like[:1]) if like.dtype != torch.bool else torch.ones_like(like[:1])
            return value.expand(count, *value.shape[1:])

        kwargs = {}
        for name in parts[0].kwargs:
            values = [p.kwargs[name] for p in parts]
            like = next((v for v in values if torch.is_tensor(v)), None)
            if like is None:
                kwargs[name] = values[0]
                continue
            kwargs[name] = torch.cat([rows(v, like, len(p.hidden)) for v, p in zip(values, parts)])
        return LayerInput(torch.cat([p.hidden for p in parts]), encoder_hidden, kwargs)

    def take(self, index: torch.Tensor, width: int) -> LayerInput:
        """These rows, their text cut to ``width`` tokens (what follows is padding, masked out), as
        normal tensors: the scoring pass's are inference tensors, which autograd cannot use."""
        import torch

        count = len(self.hidden)

        def cut(value, dims):
            if value.shape[0] == count:
                value = value[index]
            for dim in dims:
                if value.shape[dim] > width:
                    value = value.narrow(dim, 0, width)
            return value.clone()

        kwargs = {}
        for name, value in self.kwargs.items():
            if torch.is_tensor(value):
                if name not in _TEXT_DIMS:
                    raise ValueError(f"the explained layer was called with a tensor {name!r}, which evidence cannot cut to rows")
                value = cut(value, _TEXT_DIMS[name])
            kwargs[name] = value
        return LayerInput(cut(self.hidden, (1,)), cut(self.encoder_hidden, ()), kwargs)
