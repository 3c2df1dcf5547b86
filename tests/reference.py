"""The Hugging Face single-pair references every fidelity test compares against."""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, Blip2ForConditionalGeneration, BlipForImageTextRetrieval


def _processor(checkpoint: str):
    # The PIL backend, as the README promises: with torchvision installed, transformers would
    # otherwise pick its torchvision backend and the reference's pixels could change under it.
    return AutoProcessor.from_pretrained(checkpoint, backend="pil")


def _open(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def itm_reference(checkpoint: str, max_text_tokens: int | None = None):
    """``score(image_bytes, text) -> (itc, itm)`` through ``BlipForImageTextRetrieval`` on one pair
    (texts truncated to ``max_text_tokens`` tokens by the processor when given, as BLIP's ITM code does)."""
    processor = _processor(checkpoint)
    model = BlipForImageTextRetrieval.from_pretrained(checkpoint).eval()
    truncation = {"truncation": True, "max_length": max_text_tokens} if max_text_tokens else {}

    def score(data: bytes, text: str) -> tuple[float, float]:
        inputs = processor(images=_open(data), text=text, return_tensors="pt", **truncation)
        with torch.no_grad():
            itc = model(**inputs, use_itm_head=False).itm_score[0, 0].item()
            itm = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[0, 1].item()
        return itc, itm

    return score


def caption_reference(checkpoint: str, max_new_tokens: int, prompt: str | None = None):
    """``caption(image_bytes) -> str`` through ``Blip2ForConditionalGeneration.generate`` on one image."""
    processor = _processor(checkpoint)
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint).eval()

    def caption(data: bytes) -> str:
        kwargs = {"text": prompt} if prompt else {}
        inputs = processor(images=_open(data), return_tensors="pt", **kwargs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.batch_decode(out, skip_special_tokens=True)[0].strip()

    return caption


def agreement_reference(directory: str):
    """``similarity(text, caption) -> float`` through sentence-transformers' own encode, one pair at a time."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(directory, device="cpu")

    def similarity(text: str, caption: str) -> float:
        a, b = model.encode([text, caption], normalize_embeddings=True, convert_to_numpy=True)
        return float(a @ b)

    return similarity


def gradcam_reference(checkpoint: str, block_num: int, weights: torch.dtype = torch.float32):
    """``gradcam(image_bytes, text, image_embeds=None) -> (maps, tokens)``: LAVIS's ``compute_gradcam``
    (blip_image_text_matching.py) ported onto ``BlipForImageTextRetrieval`` for one pair, as transformers
    scores it ([CLS] first, no [ENC]), in fp32.

    ``maps`` is LAVIS's list for the pair: row 0 the [CLS] token's map, row 1 the mean over the word
    tokens, then one row per token after [CLS]; each ``rows*cols`` values. ``tokens``: the tokens after [CLS].

    For half-precision scoring, whose maps are still computed in fp32: ``weights=torch.bfloat16`` loads
    the weights in bf16 (as ``--precision bf16-weights`` stores them) before the port runs in fp32 on
    them; ``image_embeds`` (``(1, patches + 1, width)``) are the embeddings the text encoder attends to,
    in place of this model's own fp32 vision pass (a half-precision one is not repeatable here bit for bit).
    """
    processor = _processor(checkpoint)
    model = BlipForImageTextRetrieval.from_pretrained(checkpoint, dtype=weights).float().eval()
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    heads = model.config.text_config.num_attention_heads

    def gradcam(data: bytes, text: str, image_embeds: torch.Tensor | None = None):
        inputs = processor(images=_open(data), text=text, return_tensors="pt")
        if image_embeds is None:
            image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        else:
            image_embeds = image_embeds.float().clone()  # a normal tensor, also if made in inference mode
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = model.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, output_attentions=True,
        )
        output = model.itm_head(out.last_hidden_state[:, 0, :])
        cams = out.cross_attentions[block_num]
        (grads,) = torch.autograd.grad(output[:, 1].sum(), cams)
        with torch.no_grad():
            mask = inputs["attention_mask"].view(1, 1, -1, 1, 1)
            token_length = int(inputs["attention_mask"].sum(dim=-1)[0]) - 2
            cams = cams[:, :, :, 1:].reshape(1, heads, -1, side, side) * mask
            grads = grads[:, :, :, 1:].clamp(0).reshape(1, heads, -1, side, side) * mask
            gradcam = (cams * grads)[0].mean(0)
            gradcam = torch.cat((gradcam[0:1], gradcam[1:token_length + 1].sum(dim=0, keepdim=True) / token_length, gradcam[1:]))
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, 1:].tolist())
        return gradcam.reshape(len(gradcam), -1).numpy(), tokens

    return gradcam


def embedding_reference(checkpoint: str, max_text_tokens: int | None = None):
    """``embed(image_bytes, text) -> (image_feat, text_feat, itc)``: the normalised ITC projections
    ``BlipForImageTextRetrieval``'s own ITC forward takes the dot product of, for one pair, from the
    outputs that forward returns (the vision encoder's and the unimodal text encoder's last states)."""
    processor = _processor(checkpoint)
    model = BlipForImageTextRetrieval.from_pretrained(checkpoint).eval()
    truncation = {"truncation": True, "max_length": max_text_tokens} if max_text_tokens else {}

    def embed(data: bytes, text: str):
        inputs = processor(images=_open(data), text=text, return_tensors="pt", **truncation)
        with torch.no_grad():
            out = model(**inputs, use_itm_head=False)
            image_feat = torch.nn.functional.normalize(model.vision_proj(out.last_hidden_state[:, 0, :]), dim=-1)
            text_feat = torch.nn.functional.normalize(model.text_proj(out.question_embeds[:, 0, :]), dim=-1)
        return image_feat[0].numpy(), text_feat[0].numpy(), out.itm_score[0, 0].item()

    return embed


def labels_reference(checkpoint: str, template: str, names: list[str], top_k: int, policies: list[tuple[str, list[str]]],
                     max_text_tokens: int = 35):
    """``label(image_bytes, declared_index) -> dict``: issue 24's definitions, one single pair at a time.

    Every ``c_i`` and ``m_i`` is ``BlipForImageTextRetrieval`` on (image, prompt) alone (``itm_reference``);
    the short list, prediction, rank and policy maxima follow the contract's words, written here
    without the project's code: top_k by cosine (ties: name order) plus the declared name; prediction
    the highest ITM (ties: higher cosine); rank 1 + names with a higher cosine; a policy's itc and
    itm the max over its prompts."""
    pair = itm_reference(checkpoint, max_text_tokens)

    def prompt(name: str) -> str:
        return template.replace("{}", name) if "{}" in template else template + name

    def label(data: bytes, declared: int | None) -> dict:
        cosines = [pair(data, prompt(name))[0] for name in names]
        order = sorted(range(len(names)), key=lambda i: (-cosines[i], i))[:top_k]
        if declared is not None and declared not in order:
            order.append(declared)
        matched = {i: pair(data, prompt(names[i]))[1] for i in order}
        predicted = max(order, key=lambda i: (matched[i], cosines[i])) if order else None
        result = {
            "cosines": cosines,
            "candidates": {names[i]: (cosines[i], matched[i]) for i in order},
            "predicted": names[predicted] if predicted is not None else None,
            "score": matched[declared] if declared is not None else None,
            "rank": 1 + sum(c > cosines[declared] for c in cosines) if declared is not None else None,
            "policies": {},
        }
        for name, texts in policies:
            values = [pair(data, text) for text in texts]
            result["policies"][name] = (max(v[0] for v in values), max(v[1] for v in values))
        return result

    return label
