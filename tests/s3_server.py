"""A real S3 API on loopback for tests: moto in server mode behind a fault-injection proxy.

Ray workers are separate processes, so an in-process mock of the client would not reach them:
moto serves S3 over HTTP on 127.0.0.1, and the job reaches it the way it reaches any
S3-compatible store, through ``AWS_ENDPOINT_URL_S3`` and the AWS credential variables.
Those must be set before Ray starts (workers inherit the environment of that moment), so
``ray_session`` in conftest starts this store first whenever a test in the session uses it.

The endpoint the job sees is the proxy, which forwards every request to moto except the ones
it is told to fail: those get the 503 SlowDown or 500 InternalError a real store sends when
it throttles or hiccups. Test setup and inspection go to moto directly, past the faults.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Unmistakable values, so a test can search logs and outputs for them.
ACCESS_KEY = "AKIATESTFIXTUREKEY01"
SECRET_KEY = "fixture-SECRET-never-logged-7f3a9c"
REGION = "us-east-1"

_FAULTS = {
    503: ("Slow Down", "SlowDown", "Please reduce your request rate."),
    500: ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}
# Headers that describe one hop of the connection, not the request.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "content-length"}


@dataclass
class Logged:
    method: str
    path: str
    status: int
    at: float = field(default_factory=time.monotonic)


@dataclass
class FaultPlan:
    """Which requests fail: the next ``first`` ones, then every ``every``-th (0: none).

    Failing every k-th request (k >= 2) means a retried request lands on a healthy slot, so a
    client with retries always gets through, while every kind of request meets some faults.
    """

    first: int = 0
    every: int = 0
    statuses: tuple[int, ...] = (503, 500)


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream``; logs every request."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.plan = FaultPlan()
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._count = itertools.count(1)
        self._status_cycle = itertools.cycle(self.plan.statuses)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, first: int = 0, every: int = 0, statuses: tuple[int, ...] = (503, 500)) -> None:
        with self._lock:
            self.plan = FaultPlan(first, every, statuses)
            self._count = itertools.count(1)
            self._status_cycle = itertools.cycle(statuses)

    def reset(self) -> None:
        self.inject()
        with self._lock:
            self.log.clear()

    def faults(self) -> list[Logged]:
        return [entry for entry in self.log if entry.status in _FAULTS]

    def _fault_for_next_request(self) -> int | None:
        with self._lock:
            n = next(self._count)
            plan = self.plan
            if n <= plan.first or (plan.every and n % plan.every == 0):
                return next(self._status_cycle)
            return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append(Logged(method, path, status))


def _read_chunked(rfile) -> bytes:
    body = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(body)
        body += rfile.read(size)
        rfile.readline()


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep the test output quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return _read_chunked(self.rfile)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self):
            body = self._body()  # always consumed, so the connection stays usable after a fault
            status = proxy._fault_for_next_request()
            if status is not None:
                self._send_fault(status)
            else:
                status = self._forward(body)
            proxy._record(self.command, self.path, status)

        def _send_fault(self, status: int) -> None:
            reason, code, message = _FAULTS[status]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault</RequestId></Error>"
            ).encode()
            payload = b"" if self.command == "HEAD" else xml
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _forward(self, body: bytes) -> int:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() not in ("date", "server"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return response.status
            finally:
                connection.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@dataclass
class S3Store:
    """The running store: ``endpoint`` (the proxy, what the job uses) and direct access for tests."""

    moto_url: str
    proxy: FaultProxy
    model_cache: Path
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.proxy.address

    def client(self):
        """A boto3 client straight to moto, bypassing the faults (for setup and inspection)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.moto_url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )

    def reset(self) -> None:
        """Empty the store (moto's reset API), clear the proxy's faults and log, and the model cache."""
        request = urllib.request.Request(f"{self.moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        self.proxy.reset()
        for entry in self.model_cache.iterdir():
            _remove(entry)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, uri: str, data: bytes) -> str:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
        return uri

    def upload_dir(self, local: Path, uri: str) -> str:
        """Copy a local directory tree under the ``s3://bucket/prefix`` ``uri``."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.put(f"{uri.rstrip('/')}/{path.relative_to(local).as_posix()}", path.read_bytes())
        return uri

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def running_s3(cache: Path):
    """moto's S3 server and the fault proxy on loopback, with the AWS_* variables set to reach
    them (and ``cache`` as the model cache) until the block ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultProxy((host, port)).start()
    settings = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": proxy.address,
        # Nothing from the developer's own AWS setup, and no instance-metadata probing.
        "AWS_CONFIG_FILE": str(cache.parent / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(cache.parent / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "BLIP_MODERATE_MODEL_CACHE": str(cache),
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield S3Store(f"http://{host}:{port}", proxy, cache)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proxy.stop()
        server.stop()


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """The store for the whole test session.

    Session-scoped and started before Ray (see ``ray_session``), so Ray's workers inherit the
    endpoint, credentials and model cache location.
    """
    with running_s3(tmp_path_factory.mktemp("model-cache")) as store:
        yield store


@pytest.fixture
def s3(s3_store, ray_session):
    """A clean store with a ``test`` bucket, and a Ray that can reach it."""
    s3_store.reset()
    s3_store.create_bucket("test")
    yield s3_store
    s3_store.proxy.inject()  # no faults leak into the next test
