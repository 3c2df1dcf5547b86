"""Local paths and s3:// URIs through one pyarrow filesystem interface."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    filesystem: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def _s3_filesystem() -> pafs.S3FileSystem:
    # pyarrow reads credentials and region from the standard AWS variables itself;
    # the endpoint override serves S3-compatible stores.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return pafs.S3FileSystem(**kwargs)


def locate(uri: str) -> Location:
    if uri.startswith("s3://"):
        return Location(_s3_filesystem(), uri[len("s3://"):].rstrip("/"), uri)
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def read_bytes(uri: str) -> bytes:
    location = locate(uri)
    with location.filesystem.open_input_stream(location.path) as stream:
        return stream.read()
