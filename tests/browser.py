"""A headless Chromium driven over the DevTools protocol (aiohttp's websocket client, no extra package).

``open_page(path, expressions)`` loads a local file, waits for the load event, evaluates each
JavaScript expression, and returns them with every console error, uncaught exception, error
log entry (failed loads, CSP violations...) and every network request the page made.
``screenshot=`` saves a PNG of the element ``screenshot_selector`` names (default the whole page),
so a test's artefacts show what a person would see.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    values: dict = field(default_factory=dict)
    console_errors: list = field(default_factory=list)
    exceptions: list = field(default_factory=list)
    log_errors: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    dialogs: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return self.console_errors + self.exceptions + self.log_errors


def _wait_for_port(profile: Path, process: subprocess.Popen, timeout: float, log) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"chromium exited with {process.returncode}: {log.read()[-2000:]}")
        if marker.exists():
            lines = marker.read_text().splitlines()
            if lines and lines[0].isdigit():
                return int(lines[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


_RECT = """(() => { const e = document.querySelector(%s) || document.documentElement; const r = e.getBoundingClientRect();
  return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: Math.max(1, r.width), height: Math.max(1, r.height)}; })()"""


async def _drive(port: int, url: str, expressions: dict[str, str], timeout: float, screenshot=None, selector=None) -> PageResult:
    import aiohttp

    result = PageResult()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = 0
            pending: dict[int, asyncio.Future] = {}
            loaded = asyncio.get_running_loop().create_future()

            async def send(method, **params):
                nonlocal counter
                counter += 1
                future = asyncio.get_running_loop().create_future()
                pending[counter] = future
                await ws.send_str(json.dumps({"id": counter, "method": method, "params": params}))
                return await asyncio.wait_for(future, timeout)

            async def receive():
                async for message in ws:
                    data = json.loads(message.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                        continue
                    method, params = data.get("method"), data.get("params", {})
                    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                        result.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
                    elif method == "Runtime.exceptionThrown":
                        result.exceptions.append(params["exceptionDetails"].get("text"))
                    elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                        result.log_errors.append(params["entry"].get("text"))
                    elif method == "Network.requestWillBeSent":
                        result.requests.append(params["request"]["url"])
                    elif method == "Page.javascriptDialogOpening":
                        result.dialogs.append(params.get("message"))
                        await ws.send_str(json.dumps({"id": 0, "method": "Page.handleJavaScriptDialog", "params": {"accept": True}}))
                    elif method == "Page.loadEventFired" and not loaded.done():
                        loaded.set_result(True)

            reader = asyncio.create_task(receive())
            try:
                for domain in ("Runtime", "Log", "Network", "Page"):
                    await send(f"{domain}.enable")
                await send("Page.navigate", url=url)
                await asyncio.wait_for(loaded, timeout)
                await asyncio.sleep(0.3)  # late console messages
                for name, expression in expressions.items():
                    reply = await send("Runtime.evaluate", expression=expression, returnByValue=True)
                    remote = reply["result"]["result"]
                    if "exceptionDetails" in reply["result"]:
                        raise AssertionError(f"{name}: {reply['result']['exceptionDetails']}")
                    result.values[name] = remote.get("value")
                if screenshot is not None:
                    reply = await send("Runtime.evaluate", expression=_RECT % json.dumps(selector or "html"), returnByValue=True)
                    clip = dict(reply["result"]["result"]["value"], scale=1)
                    shot = await send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
                    Path(screenshot).write_bytes(base64.b64decode(shot["result"]["data"]))
            finally:
                reader.cancel()
    return result


# How long Chromium may take to shut down and its helpers (renderer, zygote, crashpad) to follow it,
# before they are killed. Generous: at load 16-24 on 2 cores a clean exit has been seen to take
# seconds; waiting longer costs nothing when the browser is quicker.
STOP_GRACE_S = 30.0


def _live_members(group: int) -> list[int]:
    """Processes of the process group ``group`` that are still running (zombies excluded: they write
    nothing). Linux's /proc; elsewhere, whether the group answers a signal at all."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [group]
    live = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == group and fields[0] not in "ZX":
            live.append(int(entry.name))
    return live


def stop_browser(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Ends Chromium and every helper process it started (they share its process group), and returns
    only when none of them is left to write into the profile: Chromium's helpers outlive the main
    process by a moment, and removing the profile then failed with ``Directory not empty: 'Default'``."""
    group = process.pid  # started with start_new_session=True: its own process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + grace
    while _live_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _live_members(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while _live_members(group) and time.monotonic() < deadline:
            time.sleep(0.05)


def remove_profile(profile: Path, attempts: int = 5, pause: float = 0.2) -> bool:
    """Removes the temporary profile; tries again a few times (a file can still be closing), and then
    gives up with a warning: a leftover temporary directory must never fail a test that passed."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(profile)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            error = exc
            time.sleep(pause * (attempt + 1))
    shutil.rmtree(profile, ignore_errors=True)
    if profile.exists():
        warnings.warn(f"could not remove the browser profile {profile}: {error}", stacklevel=2)
        return False
    return True


@contextlib.contextmanager
def headless_chromium(timeout: float, window: str = "1280,900", binary: str | None = None):
    """A headless Chromium on a fresh profile; yields its DevTools port, and stops it on exit (the
    browser and its helpers first, then the profile)."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary")
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    try:
        # stderr to a file, not a pipe nobody reads: a full pipe would block a chatty browser mid-shutdown.
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.Popen(
                [binary, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
                 "--disable-dev-shm-usage", "--disable-extensions", "--remote-debugging-port=0", f"--window-size={window}",
                 "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True,
            )
            try:
                yield _wait_for_port(profile, process, timeout, log)
            finally:
                stop_browser(process)
    finally:
        remove_profile(profile)


def open_page(path: Path, expressions: dict[str, str], timeout: float = 60, screenshot: Path | None = None,
              screenshot_selector: str | None = None) -> PageResult:
    with headless_chromium(timeout) as port:
        return asyncio.run(_drive(port, Path(path).resolve().as_uri(), expressions, timeout, screenshot, screenshot_selector))
