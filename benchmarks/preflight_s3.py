"""Preflight over many input files on S3: the file-by-file way against the listing and
concurrent footer reads it uses now.

    python -m benchmarks.preflight_s3 --files 300

An S3 API on loopback (moto behind the tests' proxy, tests/s3_server.py; needs the test
extra) holds ``--files`` small Parquet files of two row groups each. Preflight (plan the
units from every file's footer, fingerprint every file) runs three times each way:
``file by file`` reads the footers one after another and asks each file's size and time with
its own request, as preflight did before; ``now`` takes them from one recursive listing and
reads the footers 16 at a time. Loopback has no network latency, but every request crosses the
proxy, a Python HTTP server, at some milliseconds each; a real S3 request takes tens.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args(argv)

    from blip_ops.tiny import build_tiny_checkpoints
    from pipelines.commit import units
    from pipelines.config import build_config
    from pipelines.preflight import preflight
    from tests.s3_server import running_s3

    work = Path(tempfile.mkdtemp(prefix="preflight-s3-"))
    itm, _ = build_tiny_checkpoints(work / "models")
    (work / "cache").mkdir()
    with running_s3(work / "cache") as s3:
        s3.create_bucket("bench")
        for i in range(args.files):
            buffer = io.BytesIO()
            pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(4)], "text": ["a red circle"] * 4, "image": [b"x"] * 4}), buffer, row_group_size=2)
            s3.put(f"s3://bench/catalog/part-{i:05d}.parquet", buffer.getvalue())
        config = build_config({"input": "s3://bench/catalog", "output": "s3://bench/out", "itm_model": str(itm), "caption_model": "none"})
        file_by_file = [
            mock.patch.object(units, "FOOTER_READERS", 1),
            mock.patch("pipelines.preflight.fingerprint", lambda fs, files, directory=None: units.fingerprint(fs, files)),
        ]
        for label, patches in (("file by file", file_by_file), ("now", []), ("file by file", file_by_file), ("now", [])):
            for patch in patches:
                patch.start()
            try:
                s3.proxy.reset()
                started = time.perf_counter()
                source, _ = preflight(config)
                elapsed = time.perf_counter() - started
            finally:
                for patch in patches:
                    patch.stop()
            requests = collections.Counter(e.method for e in s3.proxy.log)
            print(f"{label:>12}: {elapsed:6.2f} s for {args.files} files ({len(source.units)} units); requests {dict(requests)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
