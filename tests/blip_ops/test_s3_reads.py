"""The driver's reads ride out the AWS SDK's flush failure (an S3 error body too big for a small ranged read)."""

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from blip_ops import s3

FLUSH = "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)"


def _failing(times: int, message: str = FLUSH):
    calls = []

    def read():
        calls.append(1)
        if len(calls) <= times:
            raise OSError(message)
        return "read"

    return read, calls


def test_a_flush_failure_is_read_again(monkeypatch):
    monkeypatch.setattr(s3.time, "sleep", lambda seconds: None)
    read, calls = _failing(2)
    assert s3.retry_flush_failures(read) == "read" and len(calls) == 3


def test_other_errors_and_a_failure_that_lasts_are_raised(monkeypatch):
    monkeypatch.setattr(s3.time, "sleep", lambda seconds: None)
    read, calls = _failing(1, "AWS Error ACCESS_DENIED during GetObject operation")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        s3.retry_flush_failures(read)
    assert len(calls) == 1
    read, calls = _failing(99)
    with pytest.raises(OSError, match="Failed to flush"):
        s3.retry_flush_failures(read)
    assert len(calls) == s3.READ_ATTEMPTS


def test_the_commits_merge_rides_out_a_flush_failure(tmp_path, monkeypatch):
    # What broke tests/pipelines/test_s3.py now and then: the commit's read of a piece hit the failure.
    # The commit now reads pieces while merging them (pipelines.commit.merge): a merged file is written
    # whole from the start again, and its counts are those of one write.
    from types import SimpleNamespace

    from pipelines.commit import merge

    monkeypatch.setattr(s3.time, "sleep", lambda seconds: None)
    staging, output = tmp_path / "staging", tmp_path / "out"
    staging.mkdir(), output.mkdir()
    pieces = []
    for i, statuses in enumerate((["ok", "ok"], ["image_error"])):
        path = str(staging / f"u{i:06d}-r0000000000-n{len(statuses):06d}.parquet")
        pq.write_table(pa.table({"status": statuses, "flagged": [True] + [False] * (len(statuses) - 1)}), path)
        pieces.append(path)

    class FlakyFileSystem(pafs.PyFileSystem):
        failures = 1

        def open_input_file(self, name):
            if FlakyFileSystem.failures and name == pieces[1]:  # the second piece: the first one already merged
                FlakyFileSystem.failures -= 1
                raise OSError(FLUSH)
            return pafs.LocalFileSystem().open_input_file(name)

    fs = FlakyFileSystem(pafs.FSSpecHandler(__import__("fsspec").filesystem("file")))
    monkeypatch.setattr(merge, "locate", lambda uri: SimpleNamespace(filesystem=fs, join=lambda name: f"{output}/{name}"))
    result = merge.merge_file({"output": str(output), "staging": str(staging), "name": "part-0.parquet", "rows": 3, "pieces": pieces})
    assert FlakyFileSystem.failures == 0
    assert (result["rows"], result["flagged"], result["by_status"]) == (3, 2, {"ok": 2, "image_error": 1})
    assert pq.read_table(output / "part-0.parquet").column("status").to_pylist() == ["ok", "ok", "image_error"]
    assert [p.name for p in staging.iterdir() if p.name.startswith(".merge-")] == []  # the failed write's temporary is gone
