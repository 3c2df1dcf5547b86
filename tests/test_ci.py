"""CI's script and the README agree, and CI never goes green without its proof: under CI=true a
failed tool install fails ``.ci/run``, and a test whose tool is missing fails instead of skipping."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_readmes_test_command_with_the_slowest_tests_listed():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):]
    quick_start = quick_start[:quick_start.index("```", quick_start.index("```") + 3)]
    (readme_command,) = re.findall(r"^(python -m pytest[^#\n]*?)\s*(?:#.*)?$", quick_start, re.M)
    (ci_command,) = re.findall(r"^(python -m pytest.*)$", SCRIPT, re.M)
    assert readme_command == ci_command
    assert "--durations=25" in ci_command.split()


def _missing(ci: str | None) -> subprocess.CompletedProcess:
    """``.ci/run``'s own ``missing`` function, run on its own."""
    function = re.search(r"^missing\(\) \{.*?^\}", SCRIPT, re.S | re.M).group(0)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(["bash", "-c", f'{function}\nmissing "could not install chromium" "the tests will skip"\necho went-on'],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_a_failed_install_fails_ci_and_only_warns_locally():
    ci = _missing("true")
    assert ci.returncode == 1 and "went-on" not in ci.stdout
    assert "error: could not install chromium" in ci.stderr
    for local in (_missing(None), _missing("")):
        assert local.returncode == 0 and "went-on" in local.stdout
        assert "warning: could not install chromium; the tests will skip" in local.stderr


def test_every_install_step_of_ci_fails_through_missing():
    for step in ("could not install chromium", "could not install label-studio",
                 "could not build the Label Studio template database",
                 "chromium is not installed and apt-get cannot install it here"):
        (line,) = [line for line in SCRIPT.splitlines() if step in line]
        assert re.search(r"(\|\| |^\s*)missing \"" + re.escape(step), line), line
    assert "will skip\" >&2" not in SCRIPT  # no bare warning left on an install step


def test_a_missing_tool_skips_locally_and_fails_under_ci(monkeypatch):
    require_or_skip(True, "never raised when the tool is there")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium binary"):
        require_or_skip(False, "no chromium binary")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no chromium binary .*CI=true"):
        require_or_skip(False, "no chromium binary")


def test_no_two_test_files_share_a_name():
    """The test folders are not packages, so pytest imports each test file by its basename: two files
    of one name fail the whole suite's collection ("import file mismatch") before any test runs."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
