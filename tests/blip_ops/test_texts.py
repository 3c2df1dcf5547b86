"""Texts a model cannot read: missing, blank, or invisible characters only."""

import pytest

from blip_ops.texts import text_problem


@pytest.mark.parametrize(
    "text",
    [
        "\u200b",  # zero-width space (Cf)
        "\u200b\u200c\u200d\u2060",  # zero-width space, non-joiner, joiner, word joiner (Cf)
        "\ufeff",  # byte-order mark (Cf)
        "\u00a0\u3000\u2003",  # no-break, ideographic and em spaces (Zs): not removed by every strip()
        "\u200e\u200f\u202e",  # direction marks and override (Cf)
        "\x00\x07\x1b",  # control characters (Cc)
        "\u2028\u2029",  # line and paragraph separators (Zl, Zp)
        "\u3164\u115f\uffa0",  # Hangul fillers (Lo, but render blank)
        "\u2800 \u034f",  # Braille blank, combining grapheme joiner
        "\ue000",  # private use (Co)
        " \u200b \t\u00ad ",  # soft hyphen (Cf) among spaces
    ],
)
def test_invisible_only_texts_are_text_errors(text):
    # Either message says "blank text"; the ones str.strip() already empties keep the plain one.
    problem = text_problem(text)
    assert problem is not None and "blank text" in problem
    if text.strip():
        assert problem.startswith("text of invisible characters only")


@pytest.mark.parametrize("text, problem", [(None, "missing text"), ("", "empty or blank text"), (" \t\n", "empty or blank text")])
def test_missing_and_blank_keep_their_reasons(text, problem):
    assert text_problem(text) == problem


@pytest.mark.parametrize(
    "text",
    ["a red circle", "\u200bred\u200b shoes", "\ufeffsofa", "赤い丸", "حذاء", "👟", "x", "\u00a0.", "ㅎ", "\u0301e"],
)
def test_texts_with_a_visible_character_are_checkable(text):
    assert text_problem(text) is None
