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


def read_bytes(uri: str) -> bytes:
    location = locate(uri)
    with location.filesystem.open_input_stream(location.path) as stream:
        return stream.read()
