"""An Azure Blob API on loopback for tests: Azurite (npm ``azurite``), in memory, as a child process.

``.ci/run`` installs it into ``.ci/node`` (``npm install --prefix .ci/node azurite@VERSION``);
``BLIP_MODERATE_AZURITE`` may name another ``azurite-blob``. Without it the Azure tests skip and
say why, except under ``CI=true``, where a missing emulator is a failure: CI must not go green
by skipping a store. The job reaches it through ``AZURE_STORAGE_CONNECTION_STRING`` (Azurite's
well-known development account), set before Ray starts like the other stores' variables.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret: every Azurite has it).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ROOT = Path(__file__).resolve().parents[1]


def azurite_binary() -> str | None:
    candidates = [os.environ.get("BLIP_MODERATE_AZURITE"), str(ROOT / ".ci/node/node_modules/.bin/azurite-blob"),
                  shutil.which("azurite-blob")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


class AzureStore:
    def __init__(self, binary: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence", "--silent",
             "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Azurite did not start (exit {self.process.poll()})") from None
                time.sleep(0.1)
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.AzureFileSystem(
            account_name=ACCOUNT, account_key=KEY, blob_storage_authority=f"127.0.0.1:{self.port}",
            dfs_storage_authority=f"127.0.0.1:{self.port}", blob_storage_scheme="http", dfs_storage_scheme="http",
        )

    def create_container(self, name: str) -> None:
        self.fs.create_dir(name)

    def put(self, uri: str, data: bytes) -> str:
        with self.fs.open_output_stream(uri.split("://", 1)[1]) as out:
            out.write(data)
        return uri

    def keys(self, prefix: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(prefix.split("://", 1)[1], recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def azure_store():
    from tests.conftest import require_or_skip

    binary = azurite_binary()
    require_or_skip(binary is not None, "Azurite not installed (.ci/run installs it: npm install --prefix .ci/node azurite)")
    store = AzureStore(binary)
    saved = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = store.connection_string
    yield store
    store.stop()
    if saved is None:
        os.environ.pop("AZURE_STORAGE_CONNECTION_STRING", None)
    else:
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = saved
