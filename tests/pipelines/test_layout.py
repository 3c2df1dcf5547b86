"""The rooms of pipelines/ keep to what their __init__ docstrings say they may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import docs

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("dataflow", "commit", "review", "reuse")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports count), relative ones resolved.
    Imports under ``if TYPE_CHECKING:`` are types only and never run, so they are left out."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _offending(folder: str, forbidden) -> dict[str, list[str]]:
    bad = {}
    for path in _files(folder):
        hits = sorted(m for m in _imports(path) if forbidden(m))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def _is_ray(module: str) -> bool:
    return module == "ray" or module.startswith("ray.")


def test_the_resolver_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    # The checks below are only as good as the import resolver: prove it on a file of our own.
    folder = ROOT / "pipelines" / "commit"
    probe = folder / "_probe_for_layout_test.py"
    probe.write_text("def f():\n    from ..run import run_job\n    import ray.data\n")
    try:
        found = _imports(probe)
    finally:
        probe.unlink()
    assert "pipelines.run" in found and "ray.data" in found


def test_blip_ops_never_imports_ray():
    assert _offending("blip_ops", _is_ray) == {}


def test_the_floors_import_only_downward():
    """jobs -> pipelines -> blip_ops, as docs/architecture.md draws them."""
    assert _offending("blip_ops", lambda m: m.startswith(("pipelines", "jobs"))) == {}
    assert _offending("pipelines", lambda m: m.startswith("jobs")) == {}


@pytest.mark.parametrize("room", ["commit", "review", "reuse"])
def test_commit_and_review_never_import_ray(room):
    assert _offending(f"pipelines/{room}", _is_ray) == {}


@pytest.mark.parametrize("room", ROOMS)
def test_no_room_imports_upward_into_the_orchestrator(room):
    upward = ("pipelines.run", "pipelines.preflight")
    assert _offending(f"pipelines/{room}", lambda m: m.startswith(upward)) == {}


def test_commit_and_review_do_not_reach_into_dataflow():
    assert _offending("pipelines/commit", lambda m: m.startswith("pipelines.dataflow")) == {}
    assert _offending("pipelines/review", lambda m: m.startswith("pipelines.dataflow")) == {}
    assert _offending("pipelines/reuse", lambda m: m.startswith("pipelines.dataflow")) == {}


def test_dataflow_reaches_commit_only_through_the_piece_writer():
    allowed = ("pipelines.commit.pieces",)
    offending = _offending(
        "pipelines/dataflow",
        lambda m: m.startswith("pipelines.commit") and m != "pipelines.commit" and not m.startswith(allowed),
    )
    assert offending == {}


def test_every_module_is_on_the_readme_map():
    section = docs.block("## Module map", "")  # docs/architecture.md, found wherever it moves
    missing = [
        str(p.relative_to(ROOT / "pipelines"))
        for p in _files("pipelines")
        if p.name != "__init__.py" and f" {p.name} " not in section
    ]
    rooms = [room for room in ROOMS if f"{room}/" not in section]
    assert missing == [] and rooms == []


def test_the_two_committers_do_not_import_each_other_and_readers_use_one_reader():
    """``delta`` builds on ``output``; ``output`` never imports ``delta`` (not even inside a function):
    reading a committed result, of either kind, is ``commit/reader.py``'s."""
    import ast

    tree = ast.parse((ROOT / "pipelines" / "commit" / "output.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name == "delta" or name.endswith(".delta")}
