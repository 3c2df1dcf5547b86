"""tests/browser.py's cleanup, without a browser: a fake Chromium (a Python script) whose helper
process goes on writing into the profile after the main process has exited, as Chromium's do.

The profile must be removed only once that helper is gone, and a profile that cannot be removed
must never fail the test that used the browser."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import browser

FAKE = '''#!{python}
import os, signal, sys, time
profile = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--user-data-dir="))
done = {done!r}
with open(done + ".profile", "w") as f:
    f.write(profile)
os.makedirs(os.path.join(profile, "Default"), exist_ok=True)
with open(os.path.join(profile, "DevToolsActivePort"), "w") as f:
    f.write("4321\\n/devtools/browser/fake\\n")

def shutdown(*_):
    if os.fork() == 0:  # the helper: flushes the profile for a while after the browser has gone
        for i in range(20):
            with open(os.path.join(profile, "Default", "flush-%d" % i), "w") as f:
                f.write("x")
            time.sleep(0.05)
        open(done, "w").close()
        os._exit(0)
    os._exit(0)  # the main process exits at once

signal.signal(signal.SIGTERM, shutdown)
while True:
    time.sleep(0.05)
'''


@pytest.fixture
def fake_chromium(tmp_path):
    done = tmp_path / "helper-finished"
    script = tmp_path / "fake-chromium"
    script.write_text(FAKE.format(python=sys.executable, done=str(done)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, done


def test_the_profile_is_removed_only_after_the_browsers_helpers_have_exited(fake_chromium, recwarn):
    script, done = fake_chromium
    with browser.headless_chromium(timeout=60, binary=str(script)) as port:
        assert port == 4321
        profile = Path(Path(f"{done}.profile").read_text())
        assert (profile / "Default").is_dir()
    # The helper wrote its last file and exited before the profile went: no write raced the removal.
    assert done.exists()
    assert not profile.exists()
    assert not [w for w in recwarn if "browser profile" in str(w.message)]


def test_a_helper_that_ignores_the_end_is_killed_and_the_wait_is_bounded(tmp_path):
    script = tmp_path / "stubborn"
    script.write_text(f"#!{sys.executable}\nimport signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "while True: time.sleep(0.05)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    process = subprocess.Popen([str(script)], start_new_session=True)
    browser.stop_browser(process, grace=0.5)
    assert process.returncode is not None
    assert browser._live_members(process.pid) == []


def test_a_profile_that_will_not_go_warns_and_never_raises(tmp_path, monkeypatch):
    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    calls = []

    def refuse(path, ignore_errors=False):
        calls.append(ignore_errors)
        if not ignore_errors:
            raise OSError(39, "Directory not empty", "Default")

    monkeypatch.setattr(browser.shutil, "rmtree", refuse)
    with pytest.warns(UserWarning, match="could not remove the browser profile"):
        assert browser.remove_profile(profile, attempts=3, pause=0) is False
    assert calls == [False, False, False, True]


def test_a_profile_that_goes_on_a_later_try_is_removed_quietly(tmp_path, monkeypatch, recwarn):
    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    real = browser.shutil.rmtree
    tries = []

    def busy_once(path, ignore_errors=False):
        tries.append(path)
        if len(tries) == 1:
            raise OSError(39, "Directory not empty", "Default")
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(browser.shutil, "rmtree", busy_once)
    assert browser.remove_profile(profile, attempts=3, pause=0) is True
    assert len(tries) == 2 and not profile.exists()
    assert not recwarn.list
