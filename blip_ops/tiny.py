"""Tiny random BLIP ITM and BLIP-2 (OPT) checkpoints for tests and the offline demo.

They are written with the ordinary Hugging Face classes and ``save_pretrained``, so
loading them exercises exactly the code path a real checkpoint takes. Their scores
and captions mean nothing.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

TINY_IMAGE_SIZE = 32
TINY_CAPTION_IMAGE_SIZE = 24
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WORDS = (
    "a an the of on in with and photo picture image red green blue yellow black white "
    "dog cat car house tree shoe shirt phone chair table cup sneaker running blue red "
    "circle square triangle stripes dots small large"
).split()

_BPE_CORPUS = [
    "a photo of a red circle", "a blue square on a white background", "a green triangle",
    "a picture of a dog", "a cat on a table", "a car in the street", "running shoes",
    "a yellow shirt with stripes", "a black phone", "a chair and a table", "a cup of tea",
]


def redraw_at_unit_gain(model: torch.nn.Module, seed: int) -> None:
    """Default init (std 0.02) makes outputs nearly constant across inputs; tests need rows to differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                std = module.in_features**-0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
            elif isinstance(module, torch.nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * fan_in**-0.5)
        for name, param in model.named_parameters():
            if name.endswith(("position_embedding", "class_embedding", "query_tokens")):
                param.copy_(torch.randn(param.shape, generator=generator))


def _bert_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return specials + list(dict.fromkeys(_WORDS)) + chars + ["##" + c for c in string.ascii_lowercase + string.digits]


def _bert_tokenizer(vocab: list[str]) -> BertTokenizer:
    """BLIP's BERT tokenizer layout ([DEC] as BOS, [ENC] special) over a small word vocabulary."""
    return BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
        model_max_length=512,
    )


def build_tiny_itm(directory: str | Path, seed: int = 0, text_layers: int = 2) -> Path:
    """Write a tiny ``BlipForImageTextRetrieval`` checkpoint with its processor to ``directory``.

    ``text_layers``: the text encoder's depth. Two is enough for scores; evidence can then explain
    layer 0 only (the last is refused), so its tests above layer 0 use a deeper one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab()
    tokenizer = _bert_tokenizer(vocab)
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "pad_token_id": vocab.index("[PAD]"),
            "bos_token_id": vocab.index("[DEC]"),
            "sep_token_id": vocab.index("[SEP]"),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=16,
        image_text_hidden_size=16,
    )
    config.architectures = ["BlipForImageTextRetrieval"]
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    redraw_at_unit_gain(model, seed)
    model.save_pretrained(directory, safe_serialization=True)
    image_processor = BlipImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def _opt_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_BPE_CORPUS, trainer=trainer)
    # OPT's tokenizer starts every sequence with </s> as BOS; generation depends on it.
    bos_id = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_blip2(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``Blip2ForConditionalGeneration`` (OPT) checkpoint with its processor."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_query_tokens = 4
    tokenizer = _opt_tokenizer()
    image_processor = BlipImageProcessorPil(
        size={"height": TINY_CAPTION_IMAGE_SIZE, "width": TINY_CAPTION_IMAGE_SIZE},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": TINY_CAPTION_IMAGE_SIZE,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "encoder_hidden_size": 32,
            "vocab_size": 100,
            "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    redraw_at_unit_gain(model, seed)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def build_tiny_checkpoints(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Both tiny checkpoints under ``root``: ``(itm_dir, caption_dir)``."""
    from transformers.utils import logging as hf_logging

    root = Path(root)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the demo's terminal
    return build_tiny_itm(root / "tiny-blip-itm", seed), build_tiny_blip2(root / "tiny-blip2-opt", seed)


# --- Benchmark checkpoints: BLIP-base layout at a chosen width and depth --------------------

BLIP_BASE_VOCAB = 30524  # bert-base-uncased plus BLIP's [DEC] and [ENC]


def bench_itm_config(width: int = 768, depth: int = 12, image_size: int = 384, vocab_size: int = BLIP_BASE_VOCAB) -> BlipConfig:
    """``BlipForImageTextRetrieval`` in BLIP-base's layout (ViT-B/16 and BERT-base: 64-wide heads,
    4x MLP, 16 px patches). The defaults are BLIP-base itself (``Salesforce/blip-itm-base-coco``);
    a smaller ``width``/``depth`` keeps the layout and shrinks the cost."""
    heads = max(1, width // 64)
    vocab = _bert_vocab()
    config = BlipConfig(
        text_config={
            "vocab_size": max(vocab_size, len(vocab)),
            "hidden_size": width,
            "encoder_hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": heads,
            "max_position_embeddings": 512,
            "pad_token_id": vocab.index("[PAD]"),
            "bos_token_id": vocab.index("[DEC]"),
            "sep_token_id": vocab.index("[SEP]"),
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": 16,
        },
        projection_dim=256,
        image_text_hidden_size=256,
    )
    config.architectures = ["BlipForImageTextRetrieval"]
    return config


def bench_itm_processor(image_size: int = 384) -> BlipProcessor:
    """The small word-level BERT tokenizer of the tiny checkpoints with an ``image_size`` processor."""
    vocab = _bert_vocab()
    tokenizer = _bert_tokenizer(vocab)
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_bench_itm(
    directory: str | Path, width: int = 384, depth: int = 6, image_size: int = 384, seed: int = 0
) -> Path:
    """Write a random-weight BLIP-base-layout ITM checkpoint (by default half width, half depth)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(bench_itm_config(width, depth, image_size)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    bench_itm_processor(image_size).save_pretrained(directory)
    return directory
