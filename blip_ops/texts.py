"""Catalog texts a model cannot read: missing, blank, or made only of invisible characters.

A title of zero-width spaces (U+200B), a byte-order mark or a Hangul filler looks empty to a
reviewer but is a non-empty string: ``str.strip()`` keeps every one of them, and BLIP would
score it as if it were text. A text counts as visible when one of its characters is outside
the Unicode categories that draw nothing (format Cf, control Cc, separators Zs/Zl/Zp,
surrogates, private use and unassigned) and outside the few letters and symbols that render
as blanks (the Hangul fillers, the Braille blank). The scan stops at the first visible
character, so an ordinary title costs one ``unicodedata`` lookup.
"""

from __future__ import annotations

import unicodedata

# Categories whose characters draw nothing (or nothing meaningful) on their own.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
# Characters in drawing categories that nevertheless render blank: Hangul fillers (Lo), the
# Braille pattern blank (So) and the combining grapheme joiner (Mn, no base to join).
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")


def is_visible(char: str) -> bool:
    return char not in BLANK_CHARACTERS and unicodedata.category(char) not in INVISIBLE_CATEGORIES


def text_problem(text) -> str | None:
    """Why ``text`` cannot be checked, or None when it can."""
    if text is None:
        return "missing text"
    if not isinstance(text, str) or not text.strip():
        return "empty or blank text"
    if not any(is_visible(char) for char in text):
        return "text of invisible characters only (empty or blank text once they are removed)"
    return None
