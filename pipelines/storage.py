"""Every place the job takes a URI: local paths, file://, s3://, gs://, az:// (abfs[s]://) through one
pyarrow filesystem interface (``blip_ops.stores`` resolves them, native clients or fsspec); image
URLs over HTTP(S) (``blip_ops.http_fetch``)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from blip_ops import stores
from blip_ops.http_fetch import Fetcher, FetchError, HttpSettings, TooLarge, is_http


@dataclass(frozen=True)
class Location:
    filesystem: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def use_backend(backend: str) -> None:
    """Make ``backend`` this process's default, and (through the environment, which a local Ray's
    workers inherit when it starts, and ``runtime.connect`` hands a cluster's) its workers' too."""
    if backend not in stores.BACKENDS:
        raise ValueError(f"unknown storage backend {backend!r}")
    os.environ[stores.BACKEND_ENV] = backend


def locate(uri: str, backend: str | None = None) -> Location:
    """``uri``'s filesystem and path (``backend``: ``native`` or ``fsspec``; None: the process's default,
    ``blip_ops.stores.default_backend``). A local path's ``uri`` is its absolute path."""
    if is_http(uri):
        raise ValueError(f"{uri}: http(s) URLs are read as image URIs only, not as a catalog, output or model")
    filesystem, path = stores.resolve(uri, backend)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Location(filesystem, path, path)
    return Location(filesystem, path, uri)


__all__ = ["FetchCache", "FetchError", "HttpSettings", "Location", "TooLarge", "is_http", "locate", "read_bytes", "read_uris"]


def read_bytes(uri: str, limit: int | None = None, http: HttpSettings | None = None) -> bytes:
    """The object's bytes; with ``limit``, an object larger than it raises ``TooLarge`` unread.

    The size comes with opening the file (a local stat; on S3 the HEAD request pyarrow makes
    anyway; an HTTP answer's Content-Length), so an oversized object costs no read. A size that
    is unknown, or that lies, is still bounded: at most ``limit + 1`` bytes are ever read.
    ``http``: settings for an http(s):// URL (default ``HttpSettings()``: private addresses refused)."""
    if is_http(uri):
        with Fetcher(http) as fetcher:
            return fetcher.fetch(uri, limit)
    location = locate(uri)
    if limit is None:
        with location.filesystem.open_input_stream(location.path) as stream:
            return stream.read()
    # The size from the object's metadata (a local stat; S3's HEAD, GCS's and Azure's metadata call),
    # then one plain read of at most limit + 1 bytes. Not a random-access file: its read of
    # limit + 1 bytes is a ranged GET past the object's end, on which the GCS emulator hangs.
    size = location.filesystem.get_file_info(location.path).size
    with location.filesystem.open_input_stream(location.path) as stream:
        return read_at_most(_Sized(stream, size), limit)


class _Sized:
    def __init__(self, stream, size: int | None):
        self.stream, self._size = stream, size

    def size(self) -> int | None:
        return self._size

    def read(self, n: int) -> bytes:
        return self.stream.read(n)


def read_at_most(handle, limit: int) -> bytes:
    """Read ``handle`` whole if it holds at most ``limit`` bytes; ``TooLarge`` otherwise."""
    try:
        size = handle.size()
    except (OSError, NotImplementedError, AttributeError):
        size = None  # a stream: only reading tells
    if size is not None and size > limit:
        raise TooLarge(size, limit)
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(None, limit)  # the stated size was wrong or missing: only "more than" is known
    return data


@dataclass(frozen=True)
class FetchCache:
    """What this run fetched over HTTP, by URL, in its work directory: the keyed plan's hash pass
    fetches every URL (keys follow bytes), and the compute pass, which decodes the rows the plan
    left to compute, takes the same bytes from here instead of fetching again. So a URL is fetched
    once per run, and the pixels scored are the bytes whose hash keyed them, even if the server
    changed the image in between. A failure is kept too (its message), so a dead URL is not
    retried a second time. Lives and dies with the attempt's work directory."""

    filesystem: pafs.FileSystem
    directory: str

    def _path(self, url: str) -> str:
        return f"{self.directory}/{hashlib.sha256(url.encode()).hexdigest()}"

    def get(self, url: str):
        """The bytes, the failure (as the exception it raised), or None when not fetched yet."""
        try:
            with self.filesystem.open_input_stream(self._path(url)) as stream:
                stored = stream.read()
        except (FileNotFoundError, OSError):
            return None
        kind, body = stored[:1], stored[1:]
        if kind == b"B":
            return body
        message = body.decode("utf-8", "replace")
        if kind == b"L":
            size, _, limit = message.partition("/")
            return TooLarge(int(size) if size else None, int(limit))
        return FetchError(message)

    def put(self, url: str, value) -> None:
        if isinstance(value, bytes):
            stored = b"B" + value
        elif isinstance(value, TooLarge):
            stored = b"L" + f"{'' if value.size is None else value.size}/{value.limit}".encode()
        elif isinstance(value, FetchError):
            stored = b"E" + str(value).encode()
        else:
            return  # an unexpected failure: not kept, the next pass tries again
        self.filesystem.create_dir(self.directory, recursive=True)
        with self.filesystem.open_output_stream(self._path(url)) as stream:
            stream.write(stored)


def read_uris(values, limit: int | None = None, http: HttpSettings | None = None, cache: FetchCache | None = None) -> list:
    """Per value: its bytes, the exception reading it raised, or None for a missing or blank URI.

    Each distinct URI is read once. HTTP(S) URLs are fetched side by side on one connection pool
    (``http.concurrency`` at a time, ``http.per_host`` connections a host); with ``cache``, a URL
    this run already fetched is taken from it, and what is fetched is put there."""
    uris = [str(v).strip() if v is not None and str(v).strip() else None for v in values]
    results: dict = {}
    urls = []
    for uri in dict.fromkeys(u for u in uris if u is not None):
        if is_http(uri):
            cached = cache.get(uri) if cache is not None else None
            if cached is None:
                urls.append(uri)
            else:
                results[uri] = cached
            continue
        try:
            results[uri] = read_bytes(uri, limit)
        except Exception as exc:  # kept per URI: the caller decides what each failure means for its row
            results[uri] = exc
    if urls:
        with Fetcher(http) as fetcher:
            fetched = fetcher.fetch_many(urls, limit)
        for url, value in fetched.items():
            results[url] = value
            if cache is not None:
                cache.put(url, value)
    return [None if u is None else results[u] for u in uris]
