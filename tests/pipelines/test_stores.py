"""blip_ops.stores in process: every scheme resolves, both backends read and write on the real
emulators (moto S3, gcp-storage-emulator, Azurite), filesystems pickle without secrets, fsspec
errors that are transient are retried."""

from __future__ import annotations

import io
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from blip_ops import stores
from pipelines.storage import locate, read_bytes, read_uris

TABLE = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})


@pytest.mark.parametrize("uri, kind, path, account", [
    ("/tmp/x/y", "local", "/tmp/x/y", None),
    ("file:///tmp/x/y", "local", "/tmp/x/y", None),
    ("relative/dir", "local", None, None),
    ("s3://bucket/key/part", "s3", "bucket/key/part", None),
    ("gs://bucket/key/", "gcs", "bucket/key", None),
    ("az://container/key", "azure", "container/key", None),
    ("abfs://container@acct.dfs.core.windows.net/a/b", "azure", "container/a/b", "acct"),
    ("abfss://container@acct.dfs.core.windows.net/a", "azure", "container/a", "acct"),
    ("memory://scratch/x", "memory", "scratch/x", None),
    ("C:/windows/path", "local", None, None),
])
def test_split(uri, kind, path, account):
    got = stores.split(uri)
    assert got[0] == kind and got[2] == account
    if path is not None:
        assert got[1] == path


def test_native_is_the_default_and_fsspec_serves_the_rest(monkeypatch):
    monkeypatch.delenv(stores.BACKEND_ENV, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    assert isinstance(locate("s3://b/k").filesystem, pafs.S3FileSystem)
    assert isinstance(locate("gs://b/k").filesystem, pafs.GcsFileSystem)
    assert isinstance(locate("az://c/k").filesystem, pafs.AzureFileSystem)
    assert locate("memory://x/y").filesystem.type_name.startswith("py::fsspec")  # no native client: fsspec
    monkeypatch.setenv(stores.BACKEND_ENV, "fsspec")
    for uri, protocol in (("s3://b/k", "s3"), ("gs://b/k", "gs"), ("az://c/k", "abfs")):
        fs = locate(uri).filesystem
        assert fs.type_name.startswith("py::fsspec") and protocol in fs.type_name, (uri, fs.type_name)
    assert locate("s3://b/k", backend="native").filesystem.type_name == "s3"


def test_unknown_backend_and_http_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown storage backend"):
        locate("s3://b/k", backend="boto")
    with pytest.raises(ValueError, match="http\\(s\\) URLs are read as image URIs only"):
        locate("https://example.com/catalog.parquet")
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    with pytest.raises(ValueError, match="needs AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME"):
        locate("az://c/k")


def test_config_and_cli_take_the_backend():
    from jobs.score import config_from_args, make_parser
    from pipelines.config import ConfigError, build_config

    assert build_config(dict(input="x", output="y")).storage_backend == "native"
    args = make_parser().parse_args(["--input", "x", "--output", "y", "--storage-backend", "fsspec"])
    assert config_from_args(args).storage_backend == "fsspec"
    with pytest.raises(ConfigError, match="storage_backend"):
        build_config(dict(input="x", output="y", storage_backend="boto"))


def test_azure_filesystems_pickle_without_the_key(monkeypatch):
    secret = "U0VDUkVULUtFWS1uZXZlci1waWNrbGVk"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", f"AccountName=acct;AccountKey={secret};BlobEndpoint=http://127.0.0.1:1/acct")
    stores._native_rebuild.cache_clear()
    for backend in stores.BACKENDS:
        fs = locate("az://c/k", backend=backend).filesystem
        data = pickle.dumps(fs)
        assert secret.encode() not in data, backend
        assert type(pickle.loads(data)) is type(fs)
    options = stores.storage_options("az://c/k")  # delta-rs: built where the call is made, never stored
    assert options == {"account_name": "acct", "access_key": secret, "endpoint": "http://127.0.0.1:1/acct", "allow_http": "true"}
    stores._native_rebuild.cache_clear()


def test_delta_storage_options(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert stores.storage_options("s3://b/t") == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true"}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9023")
    assert stores.storage_options("gs://b/t")["google_base_url"] == "http://127.0.0.1:9023"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert stores.storage_options("gs://b/t") == {}
    assert stores.storage_options("/tmp/t") is None


class _Flaky:
    """An fsspec memory filesystem whose opens fail with a transient message, then succeed."""

    def __init__(self, failures: int, message: str):
        import fsspec

        self.fs = fsspec.filesystem("memory", skip_instance_cache=True)
        self.failures, self.message, self.calls = failures, message, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.message)
        return self.fs.open(*args, **kwargs)


def test_fsspec_transient_errors_are_retried(monkeypatch):
    monkeypatch.setattr(stores.time, "sleep", lambda s: None)
    flaky = _Flaky(2, "ServerDisconnectedError: Server disconnected")
    flaky.fs.pipe("/b/x.bin", b"data")
    fs = pafs.PyFileSystem(stores.RetryingFSSpecHandler(flaky, "memory", ()))
    with fs.open_input_stream("/b/x.bin") as stream:
        assert stream.read() == b"data"
    assert flaky.calls == 3
    lasting = _Flaky(99, "ServerDisconnectedError: Server disconnected")
    lasting.fs.pipe("/b/x.bin", b"data")
    with pytest.raises(OSError, match="Server disconnected"):
        pafs.PyFileSystem(stores.RetryingFSSpecHandler(lasting, "memory", ())).open_input_stream("/b/x.bin")
    assert lasting.calls == stores.TRANSIENT_ATTEMPTS
    permanent = _Flaky(1, "Access Denied")
    with pytest.raises(OSError, match="Access Denied"):
        pafs.PyFileSystem(stores.RetryingFSSpecHandler(permanent, "memory", ())).open_input_stream("/b/x.bin")
    assert permanent.calls == 1


def test_ray_data_learns_the_fsspec_errors(monkeypatch):
    import ray.data

    from pipelines.dataflow import runtime

    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "retried_io_errors", list(context.retried_io_errors))
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: True)  # connect() without starting Ray
    runtime.connect(None)
    errors = context.retried_io_errors
    assert "AWS Error SLOW_DOWN" in errors and "SlowDown" in errors and "ServerDisconnectedError" in errors
    runtime.learn_fsspec_errors()
    assert len(context.retried_io_errors) == len(set(context.retried_io_errors))  # once, however often


def _round_trip(root: str, backend: str) -> None:
    """Parquet written, listed and read back, and an object read whole and bounded, through ``locate``."""
    location = locate(f"{root}/{backend}/table/part-0.parquet", backend=backend)
    pq.write_table(TABLE, location.path, filesystem=location.filesystem)
    directory = locate(f"{root}/{backend}/table", backend=backend)
    infos = directory.filesystem.get_file_info(pafs.FileSelector(directory.path, recursive=True))
    assert [i.base_name for i in infos if i.type == pafs.FileType.File] == ["part-0.parquet"]
    assert pq.read_table(directory.path, filesystem=directory.filesystem).equals(TABLE)
    blob = locate(f"{root}/{backend}/blob.bin", backend=backend)
    with blob.filesystem.open_output_stream(blob.path) as out:
        out.write(b"x" * 100)
    shipped = pickle.loads(pickle.dumps(blob.filesystem))  # as a Ray worker gets it
    with shipped.open_input_stream(blob.path) as stream:
        assert stream.read() == b"x" * 100
    assert read_uris([f"{root}/{backend}/blob.bin", None, f"{root}/{backend}/missing.bin"], limit=100)[0] == b"x" * 100


@pytest.mark.parametrize("backend", stores.BACKENDS)
def test_gcs_both_backends(gcs, backend, monkeypatch):
    monkeypatch.setenv(stores.BACKEND_ENV, backend)
    gcs.create_bucket("bkt")
    _round_trip("gs://bkt", backend)
    with pytest.raises(ValueError, match="exceeds the limit of 50 bytes"):
        read_bytes(f"gs://bkt/{backend}/blob.bin", limit=50)


@pytest.mark.parametrize("backend", stores.BACKENDS)
def test_azure_both_backends(azure_store, backend, monkeypatch):
    monkeypatch.setenv(stores.BACKEND_ENV, backend)
    azure_store.create_container(f"c{backend}")
    _round_trip(f"az://c{backend}", backend)


@pytest.mark.parametrize("backend", stores.BACKENDS)
def test_s3_both_backends(s3_store, backend, monkeypatch):
    monkeypatch.setenv(stores.BACKEND_ENV, backend)
    s3_store.reset()
    s3_store.create_bucket("test")
    _round_trip("s3://test", backend)
    buffer = io.BytesIO()
    pq.write_table(TABLE, buffer)
    s3_store.put("s3://test/direct.parquet", buffer.getvalue())
    assert read_bytes("s3://test/direct.parquet") == buffer.getvalue()


def test_a_label_file_on_a_store():
    import fsspec

    from pipelines.labels import LabelError, parse_labels

    fsspec.filesystem("memory").pipe("/cfg/labels.yaml", b"categories:\n  column: category\n  names: [sofa, bed]\n")
    assert parse_labels("memory://cfg/labels.yaml")["categories"]["names"] == ["sofa", "bed"]
    with pytest.raises(LabelError, match="cannot read label file memory://cfg/none.yaml"):
        parse_labels("memory://cfg/none.yaml")
