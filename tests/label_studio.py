"""A real Label Studio server on loopback for the review-queue tests, and a browser view of a task.

``label-studio`` pins packages this project cannot take (Django and friends), so it lives in its
own virtual environment: ``$BLIP_MODERATE_LABEL_STUDIO_VENV``, else ``.venv-labelstudio`` at the
repository root (``.ci/run`` creates it). Schema migrations of an empty database take 70-155 s on
2 cores, so they run once into a template database kept in that venv
(``blip-moderate-template/label_studio.sqlite3``, also built by ``.ci/run``); each server starts
from a fresh data directory holding a copy of it (13-18 s to a healthy server here, at load 16-24). The user and
its legacy API token are created by ``label-studio start --username --password --user-token``.
"""

from __future__ import annotations

import asyncio
import base64
import http.cookiejar
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD, TOKEN = "reviewer@example.com", "review-pass-1", "blip-moderate-test-token"
TEMPLATE = "blip-moderate-template"
QUIET = {"LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "LABEL_STUDIO_LOG_LEVEL": "WARNING"}


def venv() -> Path:
    return Path(os.environ.get("BLIP_MODERATE_LABEL_STUDIO_VENV") or REPO / ".venv-labelstudio")


def binary() -> Path | None:
    path = venv() / "bin" / "label-studio"
    return path if path.exists() else None


def _package_dir(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import label_studio, os; print(os.path.dirname(label_studio.__file__))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def template_db() -> Path:
    """The migrated empty database, built once (``.ci/run`` does it after installing)."""
    target = venv() / TEMPLATE / "label_studio.sqlite3"
    if target.exists():
        return target
    python = venv() / "bin" / "python"
    work = Path(tempfile.mkdtemp(prefix="ls-template-", dir=venv()))
    env = dict(os.environ, **QUIET, LABEL_STUDIO_BASE_DATA_DIR=str(work), DJANGO_SETTINGS_MODULE="core.settings.label_studio")
    subprocess.run([str(python), "manage.py", "migrate", "--no-color", "-v", "0"], cwd=_package_dir(python), env=env,
                   check=True, capture_output=True, timeout=900)
    target.parent.mkdir(exist_ok=True)
    os.replace(work / "label_studio.sqlite3", target)  # atomic: a concurrent builder loses nothing
    shutil.rmtree(work, ignore_errors=True)
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    data_dir: Path
    document_root: Path
    log: Path

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 60):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
                kind = response.headers.get("Content-Type", "")
                return json.loads(payload) if "json" in kind and payload else payload
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:1000]!r}") from None

    def session_cookies(self) -> dict:
        """Log in through the login form, as a browser does: the cookies of a logged-in session."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = opener.open(self.url + "/user/login/", timeout=60).read().decode()
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = urllib.parse.urlencode({"csrfmiddlewaretoken": csrf, "email": USER, "password": PASSWORD}).encode()
        opener.open(urllib.request.Request(self.url + "/user/login/", data=form, headers={"Referer": self.url + "/user/login/"}),
                    timeout=60)
        return {cookie.name: cookie.value for cookie in jar}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(base: Path, document_root: Path, timeout: float = 180) -> Server:
    """A server on a free loopback port, with its own data directory under ``base``."""
    data_dir = base / "label-studio-data"
    data_dir.mkdir(parents=True)
    shutil.copy(template_db(), data_dir / "label_studio.sqlite3")
    port = _free_port()
    env = dict(os.environ, **QUIET, LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(document_root), HOME=str(base))
    log = base / "label-studio.log"
    process = subprocess.Popen(
        [str(binary()), "start", "--no-browser", "--data-dir", str(data_dir), "--internal-host", "127.0.0.1",
         "--port", str(port), "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
         "--enable-legacy-api-token"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=base,
    )
    server = Server(f"http://127.0.0.1:{port}", process, data_dir, document_root, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    server.stop()
    raise TimeoutError(f"label-studio did not answer /health in {timeout} s: {log.read_text()[-3000:]}")


# ---------------------------------------------------------------------------------------------
# the task in the Label Studio UI, in headless Chromium (the DevTools protocol, as tests/browser.py)

_READY = """new Promise((resolve) => {
  const started = Date.now();
  const check = () => {
    const images = [...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 1 && i.src.includes(%s));
    const choices = document.body.innerText.includes('mismatch') && document.body.innerText.includes('unsure');
    // The labeling pane's own images (not only the data manager's thumbnails) must have arrived.
    const settled = !document.body.innerText.includes('Downloading image') && [...document.querySelectorAll('img')].every(i => i.complete);
    if (images.length && choices && settled) resolve({ok: true, text: document.body.innerText.slice(0, 4000), image: images[0].src});
    else if (Date.now() - started > %d) resolve({ok: false, text: document.body.innerText.slice(0, 4000)});
    else setTimeout(check, 200);
  };
  check();
})"""


async def _shoot(port: int, server: Server, path: str, cookies: dict, image_marker: str, screenshot: Path | None,
                 timeout: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = 0

            async def send(method, **params):
                nonlocal counter
                counter += 1
                mine = counter
                await ws.send_str(json.dumps({"id": mine, "method": method, "params": params}))
                while True:
                    message = json.loads((await asyncio.wait_for(ws.receive(), timeout)).data)
                    if message.get("id") == mine:
                        return message

            await send("Network.enable")
            for name, value in cookies.items():
                await send("Network.setCookie", name=name, value=value, url=server.url)
            await send("Page.navigate", url=server.url + path)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # the evaluation below must run in the new page, not about:blank
                state = await send("Runtime.evaluate", expression="location.href + ' ' + document.readyState", returnByValue=True)
                if str(state["result"]["result"].get("value", "")).startswith(server.url) and "complete" in str(state["result"]["result"].get("value")):
                    break
                await asyncio.sleep(0.2)
            reply = await send("Runtime.evaluate", expression=_READY % (json.dumps(image_marker), int(timeout * 1000)),
                               awaitPromise=True, returnByValue=True)
            value = reply["result"]["result"].get("value") or {}
            if screenshot is not None:
                shot = await send("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["result"]["data"]))
            return value


def view_task(server: Server, path: str, image_marker: str, screenshot: Path | None = None, timeout: float = 90) -> dict:
    """Open ``path`` of the UI logged in; wait until an image whose URL contains ``image_marker`` has
    loaded and the verdict choices show; returns ``{"ok", "text", "image"}`` (and saves a PNG)."""
    sys.path.insert(0, str(REPO))
    from tests.browser import headless_chromium

    cookies = server.session_cookies()
    with headless_chromium(timeout, window="1280,1080") as port:
        return asyncio.run(_shoot(port, server, path, cookies, image_marker, screenshot, timeout))
