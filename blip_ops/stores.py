"""Every object store through one resolver: a URI to a pyarrow filesystem and a path on it.

Schemes: local paths and ``file://``; ``s3://``; ``gs://``; ``az://``, ``abfs://`` and
``abfss://`` (``abfs[s]://container@account.dfs.core.windows.net/path`` names its account; ``az://``
takes it from the environment); and, with the fsspec backend, any protocol fsspec knows.

Two backends. ``native`` (the default) uses pyarrow's own S3, GCS and Azure clients, which the
Parquet reader and writer drive without a Python layer in between: apache/arrow #34414 read a
220 MB Parquet file natively in ~16 s where s3fs took over 3 minutes, and BENCHMARKS.md measures
both here on moto. ``fsspec`` puts every scheme on fsspec (s3fs, gcsfs, adlfs), wrapped as
``PyFileSystem(FSSpecHandler(fs))`` the way Ray Data wraps one; it is also the fallback for a
scheme pyarrow has no client for.

Nothing here holds a secret. A filesystem pickles as its *kind and plain settings* (endpoint,
account name) and is rebuilt in the receiving worker, where each client reads the credentials
from that worker's own environment: ``AWS_*`` (endpoint from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, passed here because pyarrow ignores them, apache/arrow #49643);
``GOOGLE_APPLICATION_CREDENTIALS`` or ``STORAGE_EMULATOR_HOST``; ``AZURE_STORAGE_CONNECTION_STRING``,
or ``AZURE_STORAGE_ACCOUNT_NAME`` with ``AZURE_STORAGE_ACCOUNT_KEY`` (or ``AZURE_STORAGE_SAS_TOKEN``;
without a key, Azure's default credential chain). So a filesystem shipped to Ray workers never
carries a live client or a key, and adlfs's pickling failure in Ray jobs (adlfs #516) cannot occur.
"""

from __future__ import annotations

import functools
import os
import time
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from . import s3

NATIVE, FSSPEC = "native", "fsspec"
BACKENDS = (NATIVE, FSSPEC)
# The backend where a caller names none (the job sets it from --storage-backend before Ray starts,
# and hands it to Ray's workers through their environment).
BACKEND_ENV = "BLIP_MODERATE_STORAGE_BACKEND"

_KINDS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
_FSSPEC_PROTOCOL = {"s3": "s3", "gcs": "gcs", "azure": "abfs"}
# The extra that installs each fsspec client (they are dependencies of the package; the extra
# names them for an install that left them out).
_FSSPEC_PACKAGE = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}

# Messages of transient errors the fsspec clients raise after their own retries, retried once more
# around each whole operation; with Ray Data's own list (``DataContext.retried_io_errors``, AWS SDK
# messages only) they are what ``pipelines.dataflow.runtime.learn_fsspec_errors`` gives Ray Data.
FSSPEC_TRANSIENT = (
    "SlowDown", "Please reduce your request rate", "InternalError", "ServiceUnavailable", "503", "500 Internal",
    "Server disconnected", "ServerDisconnectedError", "Connection reset", "ConnectionResetError",
    "Connection aborted", "Read timed out", "TimeoutError", "ClientOSError", "RequestTimeout",
    "ServerBusy", "OperationTimedOut", "Failed to flush response stream",
)
TRANSIENT_ATTEMPTS = 5


class StoreError(ValueError):
    """A URI no backend can serve (an unknown scheme, a client not installed)."""


def scheme_of(uri: str) -> str | None:
    """The URI's scheme, lower case; None for a plain local path (a Windows drive letter too)."""
    head, sep, _ = uri.partition("://")
    if not sep or len(head) < 2 or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return None
    return head.lower()


def is_remote(uri: str) -> bool:
    """An object-store (or other fsspec) URI: not a local path, not ``file://``, not http(s)."""
    scheme = scheme_of(uri)
    return scheme is not None and scheme not in ("file", "local", "http", "https")


def default_backend() -> str:
    backend = os.environ.get(BACKEND_ENV, NATIVE).strip().lower() or NATIVE
    if backend not in BACKENDS:
        raise StoreError(f"{BACKEND_ENV}={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def split(uri: str) -> tuple[str, str, str | None]:
    """``(kind, path, account)``: kind ``local``, ``s3``, ``gcs``, ``azure`` or the fsspec protocol;
    the path in pyarrow's form (``bucket/key``, ``container/key``, or absolute local); the Azure
    account a ``abfs[s]://container@account...`` URI names (else None)."""
    scheme = scheme_of(uri)
    if scheme is None:
        return "local", os.path.abspath(os.path.expanduser(uri)), None
    if scheme in ("file", "local"):
        return "local", os.path.abspath(urlsplit(uri).path or "/"), None
    kind = _KINDS.get(scheme, scheme)
    rest = uri.split("://", 1)[1].rstrip("/")
    account = None
    if kind == "azure":
        head, slash, tail = rest.partition("/")
        if "@" in head:
            container, host = head.split("@", 1)
            account = host.split(".", 1)[0] or None
            rest = container + slash + tail
    return kind, rest, account


def resolve(uri: str, backend: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem serving ``uri`` and the path on it. One filesystem per process and settings:
    image URIs call this once per row."""
    kind, path, account = split(uri)
    if kind == "local":
        return pafs.LocalFileSystem(), path
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise StoreError(f"unknown storage backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == NATIVE and kind in ("s3", "gcs", "azure"):
        return native(kind, account), path
    return fsspec_filesystem(_FSSPEC_PROTOCOL.get(kind, kind), account), path


# ---------------------------------------------------------------------------------------------
# native (pyarrow) clients


def _gcs_settings() -> tuple:
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    settings = (("project_id", project),) if project else ()
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        return settings  # credentials: Google's default chain (GOOGLE_APPLICATION_CREDENTIALS, metadata server)
    scheme, _, host = emulator.partition("://")
    if not host:
        scheme, host = "http", emulator
    return settings + (("anonymous", True), ("endpoint_override", host.rstrip("/")), ("scheme", scheme))


def azure_connection() -> dict:
    """``AZURE_STORAGE_CONNECTION_STRING``'s parts (AccountName, AccountKey, BlobEndpoint, ...)."""
    text = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    parts = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            parts[name.strip()] = value.strip()
    return parts


def _azure_settings(account: str | None) -> tuple:
    """Plain settings (no key): the account, and the blob endpoint of an emulator or custom domain."""
    connection = azure_connection()
    account = account or connection.get("AccountName") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise StoreError("an az:// URI needs AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME "
                         "(or an abfs[s]://container@ACCOUNT.dfs.core.windows.net/ URI)")
    settings = [("account_name", account)]
    endpoint = connection.get("BlobEndpoint")
    if endpoint:
        blob = urlsplit(endpoint)
        dfs = urlsplit(connection.get("DfsEndpoint") or endpoint)  # an emulator serves both on one port
        settings += [("blob_storage_authority", blob.netloc), ("blob_storage_scheme", blob.scheme or "https"),
                     ("dfs_storage_authority", dfs.netloc), ("dfs_storage_scheme", dfs.scheme or "https")]
    return tuple(settings)


def _azure_secrets(account: str) -> dict:
    """Read in the process that builds the client, never stored in its settings."""
    connection = azure_connection()
    if connection.get("AccountName", account) == account and connection.get("AccountKey"):
        return {"account_key": connection["AccountKey"]}
    if connection.get("SharedAccessSignature"):
        return {"sas_token": connection["SharedAccessSignature"]}
    if os.environ.get("AZURE_STORAGE_ACCOUNT_KEY"):
        return {"account_key": os.environ["AZURE_STORAGE_ACCOUNT_KEY"]}
    if os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
        return {"sas_token": os.environ["AZURE_STORAGE_SAS_TOKEN"]}
    return {}  # Azure's DefaultAzureCredential (managed identity, workload identity, az login)


class NativeGcsFileSystem(pafs.GcsFileSystem):
    """pyarrow's GCS client, pickled as its plain settings and rebuilt where it lands."""

    def __reduce__(self):
        return (_native_rebuild, ("gcs", self._settings))


class NativeAzureFileSystem(pafs.AzureFileSystem):
    """pyarrow's Azure client, pickled as account and endpoint only: pyarrow's own pickling would
    carry the account key."""

    def __reduce__(self):
        return (_native_rebuild, ("azure", self._settings))

    def move(self, src: str, dest: str) -> None:
        """pyarrow moves only on accounts with a hierarchical namespace (apache/arrow #40405); on a
        flat Blob account (and Azurite) a copy, then a delete. The copy is one whole object, so a
        reader sees the destination complete or not at all, as with S3's copy."""
        try:
            super().move(src, dest)
        except NotImplementedError:
            self.copy_file(src, dest)
            self.delete_file(src)


@functools.lru_cache(maxsize=16)
def _native_rebuild(kind: str, settings: tuple) -> pafs.FileSystem:
    if kind == "gcs":
        fs = NativeGcsFileSystem(**dict(settings))
    elif kind == "azure":
        values = dict(settings)
        fs = NativeAzureFileSystem(**values, **_azure_secrets(values["account_name"]))
    else:
        raise StoreError(f"no native client for {kind}")
    fs._settings = settings
    return fs


def native(kind: str, account: str | None = None) -> pafs.FileSystem:
    if kind == "s3":
        return s3.filesystem()
    if kind == "gcs":
        return _native_rebuild("gcs", _gcs_settings())
    return _native_rebuild("azure", _azure_settings(account))


# ---------------------------------------------------------------------------------------------
# fsspec clients


def _is_transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in FSSPEC_TRANSIENT)


class RetryingFSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's bridge to an fsspec filesystem that retries transient errors (after the client's
    own retries) around every operation that can be repeated from the start, and pickles as its
    protocol and plain settings, never as the client."""

    def __init__(self, fs, protocol: str, settings: tuple):
        super().__init__(fs)
        self.protocol, self.settings = protocol, settings

    def __reduce__(self):
        return (_handler, (self.protocol, self.settings))

    def _retry(self, name, *args):
        method = getattr(super(), name)
        for attempt in range(TRANSIENT_ATTEMPTS):
            try:
                return method(*args)
            except Exception as exc:
                if attempt == TRANSIENT_ATTEMPTS - 1 or not _is_transient(exc):
                    raise
                time.sleep(0.1 * 2**attempt)

    def get_file_info(self, paths):
        return self._retry("get_file_info", paths)

    def get_file_info_selector(self, selector):
        return self._retry("get_file_info_selector", selector)

    def open_input_file(self, path):
        return self._retry("open_input_file", path)

    def open_input_stream(self, path):
        return self._retry("open_input_stream", path)

    def create_dir(self, path, recursive):
        return self._retry("create_dir", path, recursive)

    def delete_file(self, path):
        return self._retry("delete_file", path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._retry("delete_dir_contents", path, missing_dir_ok)

    def copy_file(self, src, dest):
        return self._retry("copy_file", src, dest)


def _fsspec_settings(protocol: str, account: str | None) -> tuple:
    if protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return (("endpoint_url", endpoint),) if endpoint else ()
    if protocol == "gcs":
        return (("token", "anon"),) if os.environ.get("STORAGE_EMULATOR_HOST") else ()
    if protocol == "abfs":
        connection = azure_connection()
        name = account or connection.get("AccountName") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        return (("account_name", name),) if name else ()
    return ()


def _client(protocol: str, settings: tuple):
    import fsspec

    options = dict(settings)
    if protocol == "s3":
        # botocore's standard mode, ten attempts: the native client's retry strategy (blip_ops.s3).
        options["config_kwargs"] = {"retries": {"max_attempts": s3.MAX_ATTEMPTS, "mode": "standard"}}
    if protocol == "abfs":
        options.update(_fsspec_azure_secrets(options.get("account_name")))
    try:
        if protocol == "gcs" and os.environ.get("STORAGE_EMULATOR_HOST"):
            # gcsfs's default class first asks the storage-control gRPC API for the bucket's layout;
            # an emulator has none, and it waited out a 60 s timeout, then stalled on writes. The core
            # class speaks the JSON API only (all an emulator serves).
            from gcsfs.core import GCSFileSystem

            return GCSFileSystem(**options)
        return fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        package = {"s3": "s3fs", "gcs": "gcsfs", "abfs": "adlfs"}.get(protocol, f"the fsspec implementation of {protocol}")
        raise StoreError(f"{protocol}:// through fsspec needs {package}: pip install {package} ({exc})") from None
    except ValueError as exc:
        raise StoreError(f"no fsspec filesystem for {protocol}://: {exc}") from None


def _fsspec_azure_secrets(account: str | None) -> dict:
    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection:
        return {"connection_string": connection}
    return {k: v for k, v in _azure_secrets(account or "").items()} if account else {}


@functools.lru_cache(maxsize=16)
def _handler(protocol: str, settings: tuple) -> RetryingFSSpecHandler:
    return RetryingFSSpecHandler(_client(protocol, settings), protocol, settings)


@functools.lru_cache(maxsize=16)
def _wrapped(protocol: str, settings: tuple) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(_handler(protocol, settings))


def fsspec_filesystem(protocol: str, account: str | None = None) -> pafs.PyFileSystem:
    """The fsspec client for ``protocol`` as a pyarrow filesystem (``type_name == "py"``)."""
    return _wrapped(protocol, _fsspec_settings(protocol, account))


def storage_options(uri: str) -> dict | None:
    """delta-rs's object-store settings for ``uri`` (delta-rs takes no filesystem object): the
    endpoints and, for Azure, the account and key, from the same environment the clients read.
    Built where the Delta call is made, never stored."""
    kind, _, account = split(uri)
    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            return {}
        options = {"AWS_ENDPOINT_URL": endpoint}
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
        return options
    if kind == "gcs":
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if not emulator:
            return {}  # delta-rs reads GOOGLE_APPLICATION_CREDENTIALS itself
        return {"google_base_url": emulator if "://" in emulator else f"http://{emulator}", "allow_http": "true",
                "google_skip_signature": "true"}
    if kind == "azure":
        settings = dict(_azure_settings(account))
        options = {"account_name": settings["account_name"]}
        secrets = _azure_secrets(settings["account_name"])
        if "account_key" in secrets:
            options["access_key"] = secrets["account_key"]
        if "sas_token" in secrets:
            options["sas_key"] = secrets["sas_token"]
        endpoint = azure_connection().get("BlobEndpoint")
        if endpoint:
            options["endpoint"] = endpoint.rstrip("/")
            options["allow_http"] = "true" if endpoint.startswith("http://") else "false"
        return options
    return None
