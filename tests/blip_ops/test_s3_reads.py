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


def test_the_commits_piece_counts_ride_out_a_flush_failure(tmp_path, monkeypatch):
    # What broke tests/pipelines/test_s3.py now and then: the commit's count of a piece hit the failure.
    from pipelines.commit import output

    monkeypatch.setattr(s3.time, "sleep", lambda seconds: None)
    path = str(tmp_path / "piece.parquet")
    pq.write_table(pa.table({"status": ["ok", "ok", "image_error"], "flagged": [True, False, False]}), path)

    class FlakyFileSystem(pafs.PyFileSystem):
        failures = 1

        def open_input_file(self, name):
            if FlakyFileSystem.failures:
                FlakyFileSystem.failures -= 1
                raise OSError(FLUSH)
            return pafs.LocalFileSystem().open_input_file(name)

    fs = FlakyFileSystem(pafs.FSSpecHandler(__import__("fsspec").filesystem("file")))
    assert output._count(fs, [path]) == (3, {"image_error": 1, "ok": 2}, 1, 0)
    assert FlakyFileSystem.failures == 0
