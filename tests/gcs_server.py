"""A GCS API on loopback for tests: ``gcp-storage-emulator`` (PyPI), in memory, in a thread.

The job reaches it the way any client reaches an emulator, through ``STORAGE_EMULATOR_HOST``
(pyarrow's native client, gcsfs and delta-rs all read it through ``blip_ops.stores``). Set before
Ray starts, so workers inherit it: ``ray_session`` in conftest starts this store first whenever a
test in the session uses it. Creating a bucket needs a project id (``GOOGLE_CLOUD_PROJECT``).

The emulator serves the JSON API only: delta-rs lists through the XML API
(``GET /bucket?list-type=2``), which it answers "Method not implemented", so Delta on GCS is not
tested against it.
"""

from __future__ import annotations

import os
import socket

import pytest


class GcsStore:
    def __init__(self):
        from gcp_storage_emulator.server import create_server

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = create_server("127.0.0.1", self.port, in_memory=True)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{self.port}", scheme="http", project_id="test")

    def reset(self) -> None:
        self.server.wipe()

    def create_bucket(self, name: str) -> None:
        self.fs.create_dir(name)

    def put(self, uri: str, data: bytes) -> str:
        with self.fs.open_output_stream(uri.removeprefix("gs://")) as out:
            out.write(data)
        return uri

    def get(self, uri: str) -> bytes:
        with self.fs.open_input_stream(uri.removeprefix("gs://")) as stream:
            return stream.read()

    def keys(self, prefix: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(prefix.removeprefix("gs://"), recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def gcs_store():
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is in the [test] extra")
    store = GcsStore()
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    os.environ["STORAGE_EMULATOR_HOST"] = store.endpoint
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
    yield store
    store.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def gcs(gcs_store):
    gcs_store.reset()
    return gcs_store
