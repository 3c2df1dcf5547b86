"""Image URLs over HTTP(S): bounded, retried, size-limited fetches that refuse private addresses.

Catalog URLs come from sellers, and the job runs inside a cloud network where
``169.254.169.254`` answers with credentials. So by default a URL whose host resolves to a
loopback, link-local, private or otherwise non-public address is refused: the name is resolved
here, every address it gives must be public, the socket connects to one of those addresses (no
second look-up a rebinding DNS server could answer differently), and the peer it really reached
is checked again. Redirects are followed here, not by urllib3, so each hop goes through the same
check. ``allow_private`` turns the guard off, for catalogs served from a private CDN.

Built on urllib3 (already a dependency, through botocore and requests) rather than aiohttp: a
decode task is synchronous, and a thread pool of at most ``concurrency`` fetches over one
``PoolManager`` per task gives keep-alive, a per-host connection limit (``block=True`` makes the
extra threads wait for a connection instead of opening more) and plain blocking reads whose
timeouts urllib3 already enforces per socket operation. A body that trickles in under the read
timeout is still cut off: the whole attempt has a deadline of ``timeout`` seconds.

Every failure is a ``FetchError`` (an ``OSError``, as a failed read of any other URI is) or a
``TooLarge``, with a short message that never carries the response body: "http 404",
"timed out after 10 s", "refused: private address (127.0.0.1)".
"""

from __future__ import annotations

import email.utils
import ipaddress
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util.connection import _set_socket_options

SCHEMES = ("http://", "https://")
DEFAULT_USER_AGENT = "blip-moderate/0.1 (batch image-text moderation job)"
REDIRECTS = {301, 302, 303, 307, 308}
# Retry-After beyond this is not waited for: the row fails now, with the server's figure, rather
# than holding a decode task (and its CPU reservation) for minutes.
MAX_RETRY_AFTER_S = 60.0
CHUNK = 64 * 1024
_sleep = time.sleep  # the waits between attempts (a test replaces it)


def is_http(uri: str) -> bool:
    return uri[:8].lower().startswith(SCHEMES)


@dataclass(frozen=True)
class HttpSettings:
    """Plain, picklable settings (``pipelines.config``'s ``http_*`` options). None of them is part of
    the score key: the key is the hash of the bytes received, however they were fetched."""

    timeout: float = 10.0
    concurrency: int = 16
    per_host: int = 4
    retries: int = 3
    allow_private: bool = False
    user_agent: str = DEFAULT_USER_AGENT
    max_redirects: int = 5
    backoff: float = 0.5  # seconds before the first retry; doubled each time, with jitter


class TooLarge(ValueError):
    """An object larger than the reader's limit; nothing past the limit was read."""

    def __init__(self, size: int | None, limit: int):
        self.size, self.limit = size, limit
        shown = f"{size}" if size is not None else f"more than {limit}"
        super().__init__(f"image of {shown} bytes exceeds the limit of {limit} bytes")


class FetchError(OSError):
    """A URL that could not be fetched; ``str()`` is the row's error (no response body, ever)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "fetch failed"


class Refused(FetchError):
    """The host is (or resolves to, or connected to) a non-public address."""


class _RefusedSignal(Exception):
    """Raised inside urllib3's connect: not an OSError, so urllib3 passes it through unwrapped."""


class _Retryable(Exception):
    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.message, self.wait = message, wait


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global is False for loopback, link-local (169.254/16: cloud metadata), RFC 1918, shared
    # (100.64/10), unique-local, reserved and documentation ranges; multicast is never an image host.
    return ip.is_global and not ip.is_multicast


def _guarded(base, allow_private: bool):
    class Guarded(base):
        def _new_conn(self) -> socket.socket:
            try:
                infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise NameResolutionError(self.host, self, exc) from exc
            if not allow_private:
                for info in infos:
                    if not is_public(info[4][0]):
                        raise _RefusedSignal(info[4][0])
            error: Exception | None = None
            for family, kind, proto, _, address in infos:
                sock = None
                try:
                    sock = socket.socket(family, kind, proto)
                    _set_socket_options(sock, self.socket_options)
                    if self.timeout is not None:
                        sock.settimeout(self.timeout)
                    sock.connect(address)  # the resolved address itself: no second look-up
                except socket.timeout as exc:
                    if sock is not None:
                        sock.close()
                    error = ConnectTimeoutError(self, f"connect timeout={self.timeout}")
                    error.__cause__ = exc
                    continue
                except OSError as exc:
                    if sock is not None:
                        sock.close()
                    error = NewConnectionError(self, f"Failed to establish a new connection: {exc}")
                    continue
                peer = sock.getpeername()[0]
                if not allow_private and not is_public(peer):
                    sock.close()
                    raise _RefusedSignal(peer)
                return sock
            raise error or NewConnectionError(self, "no address to connect to")

    return Guarded


def _pool_manager(settings: HttpSettings) -> urllib3.PoolManager:
    manager = urllib3.PoolManager(
        num_pools=64, maxsize=settings.per_host, block=True,
        headers={"User-Agent": settings.user_agent, "Accept": "image/*,*/*;q=0.5"},
    )
    pools = {}
    for scheme, pool_base, conn_base in (("http", HTTPConnectionPool, HTTPConnection), ("https", HTTPSConnectionPool, HTTPSConnection)):
        pools[scheme] = type(f"Guarded{pool_base.__name__}", (pool_base,), {"ConnectionCls": _guarded(conn_base, settings.allow_private)})
    manager.pool_classes_by_scheme = pools
    return manager


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    """One decode task's HTTP client: a connection pool shared by ``concurrency`` threads. Use as a
    context manager (the pool is closed at the end of the task)."""

    def __init__(self, settings: HttpSettings | None = None):
        self.settings = settings or HttpSettings()
        self.manager = _pool_manager(self.settings)
        self.counts = {"fetched": 0, "retries": 0, "bytes": 0}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.manager.clear()

    def fetch(self, url: str, limit: int | None = None) -> bytes:
        """The body of ``url`` (after redirects); ``FetchError`` or ``TooLarge`` otherwise."""
        settings = self.settings
        attempt = 0
        while True:
            try:
                data = self._follow(url, limit)
                self.counts["fetched"] += 1
                self.counts["bytes"] += len(data)
                return data
            except _Retryable as exc:
                if attempt >= settings.retries:
                    suffix = f" after {attempt} retr{'y' if attempt == 1 else 'ies'}" if attempt else ""
                    raise FetchError(f"{exc.message}{suffix}") from None
                if exc.wait is not None and exc.wait > MAX_RETRY_AFTER_S:
                    raise FetchError(f"{exc.message} (Retry-After {exc.wait:g} s is longer than {MAX_RETRY_AFTER_S:g} s)") from None
                wait = exc.wait if exc.wait is not None else settings.backoff * 2**attempt * (0.5 + random.random())
                attempt += 1
                self.counts["retries"] += 1
                _sleep(wait)

    def fetch_many(self, urls, limit: int | None = None) -> dict:
        """Each distinct URL once, ``concurrency`` at a time: URL -> bytes, or the exception it raised."""
        distinct = list(dict.fromkeys(urls))

        def one(url):
            try:
                return url, self.fetch(url, limit)
            except Exception as exc:  # one URL never fails the batch: the caller makes it the row's error
                return url, exc

        if len(distinct) <= 1:
            return dict(one(u) for u in distinct)
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(distinct))) as pool:
            return dict(pool.map(one, distinct))

    def _follow(self, url: str, limit: int | None) -> bytes:
        for _ in range(self.settings.max_redirects + 1):
            if not is_http(url):
                raise FetchError(f"redirected to a non-HTTP URL ({urlsplit(url).scheme or 'relative'})")
            location = self._attempt(url, limit)
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)
        raise FetchError(f"too many redirects (more than {self.settings.max_redirects})")

    def _attempt(self, url: str, limit: int | None):
        """Bytes, or a redirect's ``Location``; raises ``_Retryable`` for what a retry may fix."""
        timeout = self.settings.timeout
        deadline = time.monotonic() + timeout
        timed_out = f"timed out after {timeout:g} s"
        try:
            response = self.manager.urlopen(
                "GET", url, redirect=False, retries=False, preload_content=False, decode_content=True,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
            )
        except _RefusedSignal as exc:
            raise Refused(f"refused: private address ({exc.args[0]})") from None
        except ReadTimeoutError:
            raise FetchError(timed_out) from None
        except ConnectTimeoutError as exc:
            if isinstance(exc, NameResolutionError):
                raise FetchError(f"cannot resolve host {urlsplit(url).hostname}") from None
            if isinstance(exc, NewConnectionError):
                raise _Retryable("cannot connect") from None
            raise _Retryable(f"connect {timed_out}") from None
        except (ProtocolError, HTTPError, OSError) as exc:
            raise _Retryable(f"connection error: {type(exc).__name__}") from None
        except ValueError as exc:  # a malformed URL
            raise FetchError(f"bad URL: {exc}") from None
        try:
            status = response.status
            if status in REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"http {status} without a Location")
                return location
            if status == 429 or 500 <= status < 600:
                raise _Retryable(f"http {status}", _retry_after(response.headers.get("Retry-After")))
            if status != 200:
                raise FetchError(f"http {status}")
            length = response.headers.get("Content-Length")
            if limit is not None and length and length.strip().isdigit() and int(length) > limit:
                raise TooLarge(int(length), limit)  # refused before the body is read
            parts, received = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise FetchError(timed_out)
                chunk = response.read1(CHUNK)  # what has arrived: read(n) would wait for all n bytes
                if not chunk:
                    break
                received += len(chunk)
                if limit is not None and received > limit:
                    raise TooLarge(None, limit)  # no length, or a lying one: cut off at the limit
                parts.append(chunk)
            return b"".join(parts)
        except ReadTimeoutError:
            raise FetchError(timed_out) from None
        except (ProtocolError, HTTPError, OSError) as exc:  # IncompleteRead: the connection dropped mid-body
            if isinstance(exc, (FetchError, TooLarge)):
                raise
            raise _Retryable("truncated body" if "IncompleteRead" in str(exc) else f"connection error: {type(exc).__name__}") from None
        finally:
            response.close()
            response.release_conn()
