"""The documentation holds together: every relative link of README.md and docs/ reaches a file, and
every #anchor a heading on its page (the README was split into pages; a link left pointing at the
old place fails here), and a block is found on whichever page holds it."""

from __future__ import annotations

import re

import pytest

from tests import docs

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path) -> set[str]:
    text, fenced, found = path.read_text(), False, set()
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(re.sub(r"[^\w\- ]", "", line.split(" ", 1)[1].strip().lower()).replace(" ", "-"))
    return found


def _links(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://|mailto:", t)]


@pytest.mark.parametrize("page", docs.doc_pages() + [docs.ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in _links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert broken == []


def test_the_readme_stays_a_front_door():
    readme = (docs.ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("scoring", "nightly", "output", "signals", "review", "cluster", "performance", "fidelity", "architecture"):
        assert f"(docs/{page}.md" in readme, page


def test_a_block_is_found_on_its_page_and_only_there(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# t\n\n## Moved\n\nsee docs\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Block\n\n```sql\nSELECT 1\n```\n\n## Next\n\n```sql\nSELECT 2\n```\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs.block("## Block", "sql") == "SELECT 1\n"  # not the next section's
    with pytest.raises(AssertionError, match="Gone"):
        docs.section("## Gone")
    (tmp_path / "docs" / "b.md").write_text("## Block\n")
    with pytest.raises(AssertionError, match="a.md.*b.md"):
        docs.section("## Block")


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, arguments) of every `python -m jobs.X ...` line in a ```bash block."""
    import shlex

    found = []
    for page in docs.doc_pages():
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.match(r"python -m (jobs\.\w+)(.*)", line.strip())
                if match and "$" not in line:
                    found.append((page.name, match.group(1), shlex.split(match.group(2), comments=True)))
    return found


def test_every_documented_command_parses_with_its_cli():
    """The commands the pages show are ones the CLIs accept (parsed, not run): a renamed or
    removed option fails here, on whichever page still shows it."""
    import importlib

    commands = _documented_commands()
    assert {module for _, module, _ in commands} >= {"jobs.score", "jobs.nightly", "jobs.review", "jobs.calibrate"}
    assert any(page == "README.md" for page, _, _ in commands)
    for page, module, arguments in commands:
        if module == "jobs.demo":
            continue
        parser = importlib.import_module(module).make_parser()
        try:
            parser.parse_args(arguments)
        except SystemExit as exc:
            raise AssertionError(f"{page}: python -m {module} {' '.join(arguments)}") from exc


def test_the_documented_output_columns_are_the_schema():
    """docs/output.md's column table, and the README's one-line list made from it, name exactly
    pipelines/schema.py's output columns, in order: a new column is documented or this fails."""
    from pipelines.schema import OUTPUT_COLUMNS

    table = [line for line in docs.section("## Output").splitlines() if line.startswith("| `")]
    documented = [name for line in table for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])]
    assert documented == OUTPUT_COLUMNS
    readme = (docs.ROOT / "README.md").read_text()
    listed = readme.split("All columns: ", 1)[1].split(". ", 1)[0]
    assert re.findall(r"`([a-z_0-9]+)`", listed) == OUTPUT_COLUMNS
