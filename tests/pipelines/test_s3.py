"""Object storage through a real S3 API on loopback (moto's server behind a fault-injection proxy).

One job run carries most of it: the input catalog, the image URIs, both model directories and
the output all live on S3, and the proxy answers every eighth request with 503 SlowDown or
500 InternalError. The run must still produce each input row exactly once.
"""

import io
import json
import multiprocessing
import pickle
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from blip_ops import model_cache
from blip_ops import s3 as s3fs
from blip_ops.checkpoints import ITM, CheckpointError, inspect_checkpoint
from blip_ops.samples import draw_shape
from pipelines.config import build_config
from pipelines.preflight import InputError, preflight
from pipelines.run import run_job
from pipelines.storage import locate, read_bytes
from tests.s3_server import ACCESS_KEY, SECRET_KEY

BUCKET = "test"


def _catalog_records(s3_store) -> list[dict]:
    records = []
    for index, (color, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                            ("yellow", "circle"), ("red", "square"), ("blue", "triangle")]):
        uri = s3_store.put(f"s3://{BUCKET}/images/{index}.jpg", draw_shape(color, shape))
        records.append({"row_key": index, "title": f"a {color} {shape}", "uri": uri, "expect": "ok"})
    records.append({"row_key": 6, "title": "gone", "uri": f"s3://{BUCKET}/images/missing.jpg", "expect": "image_error"})
    records.append({"row_key": 7, "title": "no bucket", "uri": "s3://no-such-bucket/x.jpg", "expect": "image_error"})
    records.append({"row_key": 8, "title": "  ", "uri": records[0]["uri"], "expect": "text_error"})
    return records


def _put_catalog(s3_store, records: list[dict], files: int) -> str:
    per_file = -(-len(records) // files)
    for index in range(files):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records[index * per_file:(index + 1) * per_file]), buffer)
        s3_store.put(f"s3://{BUCKET}/catalog/part-{index}.parquet", buffer.getvalue())
    return f"s3://{BUCKET}/catalog"


def _successful_gets(proxy, key_suffix: str) -> int:
    return sum(1 for e in proxy.log if e.method == "GET" and e.path.split("?")[0].endswith(key_suffix) and e.status in (200, 206))


@pytest.fixture(scope="module")
def s3_run(s3_store, ray_session, tiny_itm, tiny_caption):
    s3_store.reset()
    s3_store.create_bucket(BUCKET)
    itm_uri = s3_store.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/itm")
    caption_uri = s3_store.upload_dir(Path(tiny_caption), f"s3://{BUCKET}/models/caption")
    records = _catalog_records(s3_store)
    catalog = _put_catalog(s3_store, records, files=3)
    s3_store.proxy.log.clear()
    s3_store.proxy.inject(every=8)
    config = build_config(dict(
        input=catalog, output=f"s3://{BUCKET}/scored", itm_model=itm_uri, caption_model=caption_uri,
        device="cpu", id_column="row_key", text_column="title", image_uri_column="uri",
        max_new_tokens=3, decode_batch_size=3, score_batch_size=4, caption_batch_size=4,
    ))
    summary = run_job(config)
    s3_store.proxy.inject()
    return dict(summary=summary, records=records, config=config, itm_uri=itm_uri, caption_uri=caption_uri)


def _output_rows(s3_store) -> list[dict]:
    keys = [k for k in s3_store.keys(BUCKET, "scored/") if k.endswith(".parquet") and "/_" not in k]
    rows = []
    for key in keys:
        rows += pq.read_table(io.BytesIO(s3_store.get(f"s3://{BUCKET}/{key}"))).to_pylist()
    return rows


def test_every_row_exactly_once_through_faults(s3_run, s3_store):
    records = s3_run["records"]
    rows = _output_rows(s3_store)
    assert Counter(r["row_key"] for r in rows) == Counter(r["row_key"] for r in records)
    by_key = {r["row_key"]: r for r in rows}
    for record in records:
        row = by_key[record["row_key"]]
        assert row["status"] == record["expect"], (record, row["error"])
        assert row["uri"] == record["uri"]
        if record["expect"] == "ok":
            assert row["itm_score"] is not None and row["caption"] is not None
    assert "cannot read image URI" in by_key[6]["error"]
    summary = s3_run["summary"]
    assert summary.rows_read == summary.rows_written == len(records)
    # The faults really happened, of both kinds, on reads and writes alike.
    faults = s3_store.proxy.faults()
    assert {e.status for e in faults} == {503, 500}
    assert {e.method for e in faults} >= {"GET", "PUT"} or {e.method for e in faults} >= {"GET", "POST"}


def test_manifest_on_s3_without_secrets(s3_run, s3_store):
    keys = s3_store.keys(BUCKET, "scored/")
    assert "scored/_manifest.json" in keys
    manifest = s3_store.get(f"s3://{BUCKET}/scored/_manifest.json").decode()
    assert json.loads(manifest)["config"]["itm_model"] == s3_run["itm_uri"]
    for key in keys:  # the manifest, parts, run records, reports: nothing written holds a credential
        body = s3_store.get(f"s3://{BUCKET}/{key}")
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body, key
    errors = " ".join(r["error"] or "" for r in _output_rows(s3_store))
    assert SECRET_KEY not in errors and ACCESS_KEY not in errors


def test_no_secret_in_ray_logs(s3_run, ray_session):
    session_dir = Path(ray_session._private.worker._global_node.get_session_dir_path())
    scanned = 0
    for path in session_dir.joinpath("logs").rglob("*"):
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path
            scanned += 1
    assert scanned > 0


def test_models_copied_once_per_node(s3_run, s3_store):
    # Decode tasks, the scoring actor and the captioning actor all needed the models; each
    # model's weights crossed the network once, and the cache holds one complete copy of each.
    assert _successful_gets(s3_store.proxy, "models/itm/model.safetensors") == 1
    assert _successful_gets(s3_store.proxy, "models/caption/model.safetensors") == 1
    entries = sorted(p.name for p in s3_store.model_cache.iterdir() if p.is_dir())
    assert len(entries) == 2 and not [e for e in entries if e.startswith(".")], entries
    for entry in entries:
        record = json.loads((s3_store.model_cache / entry / model_cache.SOURCE_RECORD).read_text())
        assert record["uri"] in (s3_run["itm_uri"], s3_run["caption_uri"])


def test_cache_is_shared_by_processes_and_refetched_when_the_model_changes(s3, tiny_itm):
    uri = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/itm")
    # A download killed halfway left a temporary directory: never used, removed by the next one.
    stale = s3.model_cache / f".{model_cache.cache_name(uri, model_cache.list_remote(uri))}.killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        dirs = pool.map(model_cache.local_model_dir, [uri] * 3)
    assert len(set(dirs)) == 1 and not stale.exists()
    assert _successful_gets(s3.proxy, "models/itm/model.safetensors") == 1
    first = Path(dirs[0])
    assert sorted(p.name for p in first.iterdir()) == sorted(
        [p.name for p in Path(tiny_itm).iterdir()] + [model_cache.SOURCE_RECORD]
    )
    assert model_cache.local_model_dir(uri) == dirs[0]  # unchanged: no new copy

    config = json.loads((Path(tiny_itm) / "config.json").read_text())
    config["_comment"] = "re-uploaded"
    s3.put(f"{uri}/config.json", json.dumps(config).encode())
    second = Path(model_cache.local_model_dir(uri))
    assert second != first and json.loads((second / "config.json").read_text())["_comment"] == "re-uploaded"
    assert _successful_gets(s3.proxy, "models/itm/model.safetensors") == 2


def test_s3_problems_are_input_errors_without_secrets(s3, tiny_itm, tmp_path):
    uri = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/itm")
    assert inspect_checkpoint(uri, ITM)["model_type"] == "blip"
    assert not any(s3.model_cache.iterdir())  # the check read config.json, no weights

    with pytest.raises(CheckpointError, match="does not exist") as missing:
        inspect_checkpoint(f"s3://{BUCKET}/models/nothing-here", ITM)
    s3.put(f"s3://{BUCKET}/models/pickled/config.json", (Path(tiny_itm) / "config.json").read_bytes())
    s3.put(f"s3://{BUCKET}/models/pickled/pytorch_model.bin", b"pickle")
    with pytest.raises(CheckpointError, match="no safetensors") as pickled:
        inspect_checkpoint(f"s3://{BUCKET}/models/pickled", ITM)

    values = dict(output=str(tmp_path / "out"), itm_model=uri, caption_model="none", device="cpu")
    with pytest.raises(InputError, match="does not exist") as no_input:
        preflight(build_config(dict(values, input=f"s3://{BUCKET}/no/catalog")))
    with pytest.raises(InputError) as no_bucket:
        preflight(build_config(dict(values, input="s3://no-such-bucket/catalog")))
    for error in (missing, pickled, no_input, no_bucket):
        assert SECRET_KEY not in str(error.value) and ACCESS_KEY not in str(error.value)


def test_one_filesystem_per_process_that_keeps_its_retries_when_shipped(s3):
    fs = s3fs.filesystem()
    assert s3fs.filesystem() is fs and locate(f"s3://{BUCKET}/a").filesystem is fs
    shipped = pickle.dumps(fs)  # what Ray sends to its workers
    assert SECRET_KEY.encode() not in shipped and ACCESS_KEY.encode() not in shipped
    assert pickle.loads(shipped) is fs  # rebuilt with the same retry strategy, not pyarrow's default

    s3.put(f"s3://{BUCKET}/probe.bin", b"payload")
    s3.proxy.inject(first=3)  # pyarrow's default: three attempts, all answered 503 or 500
    default = pafs.S3FileSystem(endpoint_override=s3.endpoint.removeprefix("http://"), scheme="http")
    with pytest.raises(OSError, match="SLOW_DOWN|INTERNAL|503|500") as failed:
        default.open_input_stream(f"{BUCKET}/probe.bin").read()
    assert SECRET_KEY not in str(failed.value)
    s3.proxy.inject(first=4)  # ours outlasts more
    assert read_bytes(f"s3://{BUCKET}/probe.bin") == b"payload"
    assert len(s3.proxy.faults()) == 3 + 4


def _resolve_in_another_process(uri):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return Path(pool.apply(model_cache.local_model_dir, (uri,)))


def _reupload(s3, uri, tiny_itm, comment):
    config = json.loads((Path(tiny_itm) / "config.json").read_text())
    config["_comment"] = comment
    s3.put(f"{uri}/config.json", json.dumps(config).encode())


def test_a_replaced_model_is_evicted_once_no_process_uses_it(s3, tiny_itm):
    uri = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/evicted")
    old = _resolve_in_another_process(uri)  # that process has exited: nothing uses the copy now
    assert old.is_dir()
    _reupload(s3, uri, tiny_itm, "v2")
    new = Path(model_cache.local_model_dir(uri))
    assert new.is_dir() and json.loads((new / "config.json").read_text())["_comment"] == "v2"
    assert not old.exists()
    assert not any(p.name.startswith(old.name) for p in s3.model_cache.iterdir())  # its lock files too


def test_a_model_copy_in_use_is_kept_until_its_users_exit(s3, tiny_itm):
    uri = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/in-use")
    other = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/other")
    in_use = Path(model_cache.local_model_dir(uri))  # this test's process now uses it, as a live actor would
    unrelated = _resolve_in_another_process(other)
    _reupload(s3, uri, tiny_itm, "v2")
    replacement = _resolve_in_another_process(uri)
    assert replacement != in_use and replacement.is_dir()
    assert in_use.is_dir() and (in_use / "model.safetensors").is_file()
    assert unrelated.is_dir()  # another URI's copy is never touched


def test_preflight_lists_the_input_once_instead_of_asking_file_by_file(s3, tiny_itm):
    """A nightly partition can hold thousands of files: one listing gives their sizes and times."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.commit.units import fingerprint
    from pipelines.config import build_config
    from pipelines.preflight import preflight

    for i in range(6):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": [str(i)], "text": ["t"], "image": [b"x"]}), buffer)
        s3.put(f"s3://{BUCKET}/many/part-{i}.parquet", buffer.getvalue())
    config = build_config({"input": f"s3://{BUCKET}/many", "output": f"s3://{BUCKET}/out", "itm_model": tiny_itm, "caption_model": "none"})
    s3.proxy.reset()
    source, _ = preflight(config)
    assert len(source.units) == 6
    assert not [e for e in s3.proxy.log if e.method == "HEAD" and e.path.split("?")[0].endswith(".parquet")]
    # The listing gives the same sizes and times as asking each file, so run keys do not change.
    by_listing = fingerprint(source.location.filesystem, source.files, source.location.path)
    by_file = fingerprint(source.location.filesystem, source.files)
    assert by_listing == by_file, (by_listing[:1], by_file[:1])


def test_a_reupload_during_the_copy_is_never_cached_as_a_mixture(s3, tiny_itm, monkeypatch):
    """S3 has no snapshot of a prefix: the copy is checked against a listing taken after it."""
    uri = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/racing")
    real_download = model_cache._download
    copied = []

    def download_then_reupload(uri_, files, into):
        real_download(uri_, files, into)
        copied.append(into)
        if len(copied) == 1:  # the model is re-uploaded while the first copy is under way
            _reupload(s3, uri, tiny_itm, "v2")

    monkeypatch.setattr(model_cache, "_download", download_then_reupload)
    resolved = Path(model_cache.local_model_dir(uri))
    assert len(copied) == 2 and not copied[0].exists()  # the first copy was discarded
    assert json.loads((resolved / "config.json").read_text())["_comment"] == "v2"
    record = json.loads((resolved / model_cache.SOURCE_RECORD).read_text())
    assert record["files"] == [vars(f) for f in model_cache.list_remote(uri)]
    assert sorted(p.name for p in s3.model_cache.iterdir() if p.is_dir()) == [resolved.name]


def test_a_model_that_keeps_changing_is_an_error_after_three_copies(s3, tiny_itm, monkeypatch):
    uri = s3.upload_dir(Path(tiny_itm), f"s3://{BUCKET}/models/churning")
    real_download = model_cache._download
    copies = []

    def download_then_reupload(uri_, files, into):
        copies.append(into)
        real_download(uri_, files, into)
        _reupload(s3, uri, tiny_itm, "v" + "x" * len(copies))  # a new size each time

    monkeypatch.setattr(model_cache, "_download", download_then_reupload)
    with pytest.raises(model_cache.ModelCacheError, match="changed on S3 while it was being copied, 3 times"):
        model_cache.local_model_dir(uri)
    assert len(copies) == 3
    assert not any(p.is_dir() for p in s3.model_cache.iterdir())  # no copy left under any name


def test_an_s3_object_over_the_limit_is_refused_unread(s3_store):
    from pipelines.storage import TooLarge

    s3_store.create_bucket("limits")
    small = s3_store.put("s3://limits/small.bin", b"s" * 1000)
    large = s3_store.put("s3://limits/large.bin", b"L" * 300_000)
    s3_store.proxy.log.clear()
    assert read_bytes(small, limit=1000) == b"s" * 1000
    with pytest.raises(TooLarge, match="image of 300000 bytes exceeds the limit of 1000 bytes"):
        read_bytes(large, limit=1000)
    assert _successful_gets(s3_store.proxy, "large.bin") == 0  # its size came from the HEAD request alone
    assert _successful_gets(s3_store.proxy, "small.bin") == 1
