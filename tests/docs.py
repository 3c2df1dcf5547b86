"""The documentation as the tests read it: README.md and the docs/ pages, wherever a block lives.

Tests that run a documented block (the DuckDB queries, the Delta time-travel example, the module
map) find it by its heading across every page, so moving a section between pages does not break
them, and a heading that goes missing (or appears twice) fails with the pages searched.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_text() -> str:
    """Every page, README.md first, one after the other."""
    return "\n".join(page.read_text() for page in doc_pages())


def section(heading: str) -> str:
    """The text under ``heading`` (a whole line such as ``"### DuckDB queries"``) up to the next
    heading of the same or a higher level on its page; exactly one page must have it."""
    level = len(heading) - len(heading.lstrip("#"))
    found = []
    for page in doc_pages():
        lines, fenced, inside, body = page.read_text().splitlines(keepends=True), False, False, []
        for line in lines:
            if line.lstrip().startswith("```"):
                fenced = not fenced
            heading_here = not fenced and re.match(r"(#{1,6}) ", line)
            if inside and heading_here and len(heading_here.group(1)) <= level:
                break
            if inside:
                body.append(line)
            elif heading_here and line.rstrip("\n") == heading:
                inside = True
        if inside:
            found.append((page, "".join(body)))
    assert len(found) == 1, f"{heading!r} is under {[str(p.relative_to(ROOT)) for p, _ in found]} of {[p.name for p in doc_pages()]}"
    return found[0][1]


def block(heading: str, language: str) -> str:
    """The first fenced ``language`` block under ``heading``."""
    text = section(heading)
    assert f"```{language}\n" in text, f"no ```{language} block under {heading!r}"
    return text.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def queries(heading: str) -> dict[str, str]:
    """The documented SQL block under ``heading``, one query per statement, keyed by its leading
    ``-- comment`` line (how the pages title their queries)."""
    found = {}
    for statement in block(heading, "sql").split(";"):
        lines = statement.strip().splitlines()
        if lines:
            found[lines[0].removeprefix("-- ").strip()] = "\n".join(lines[1:])
    return found
