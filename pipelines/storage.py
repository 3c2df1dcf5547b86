"""Local paths and s3:// URIs through one pyarrow filesystem interface."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from blip_ops import s3


@dataclass(frozen=True)
class Location:
    filesystem: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def locate(uri: str) -> Location:
    if uri.startswith("s3://"):
        # One filesystem per process (see blip_ops.s3): image URIs call this once per row.
        return Location(s3.filesystem(), s3.split_uri(uri), uri)
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


class TooLarge(ValueError):
    """An object larger than the reader's limit; nothing past the limit was read."""

    def __init__(self, size: int | None, limit: int):
        self.size, self.limit = size, limit
        shown = f"{size}" if size is not None else f"more than {limit}"
        super().__init__(f"image of {shown} bytes exceeds the limit of {limit} bytes")


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The object's bytes; with ``limit``, an object larger than it raises ``TooLarge`` unread.

    The size comes with opening the file (a local stat; on S3 the HEAD request pyarrow makes
    anyway), so an oversized object costs no read. A size that is unknown, or that lies, is
    still bounded: at most ``limit + 1`` bytes are ever read."""
    location = locate(uri)
    if limit is None:
        with location.filesystem.open_input_stream(location.path) as stream:
            return stream.read()
    with location.filesystem.open_input_file(location.path) as handle:
        return read_at_most(handle, limit)


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
