"""Storage backends side by side on moto S3, and image URLs per second per decode task over HTTP.

    python -m benchmarks.storage_backends [--rows 200000] [--images 200] [--urls 200] [--latency 0.05]

Backends: ``native`` (pyarrow's S3 client) and ``fsspec`` (s3fs), through ``blip_ops.stores``
exactly as the job resolves them, against moto's S3 server on loopback (tests/s3_server.py,
straight to moto, not through the fault proxy). Per backend, alternating, three rounds each:
write one Parquet file of ``--rows`` catalog-like rows, read it back whole, and read ``--images``
JPEG objects through ``storage.read_uris`` (as the decode tasks read image URIs). Loopback has
no network latency and moto is a Python server; the figures compare the clients' overheads,
not a real store's throughput.

HTTP: ``--urls`` distinct image URLs fetched by one decode task's ``read_uris`` (one connection
pool, ``http_concurrency`` threads, ``http_per_host`` connections) from the tests' loopback server
with ``--latency`` seconds added to every answer; URLs per second at concurrency 1, 4 and the
defaults (16 threads, 4 connections per host).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _catalog(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({
        "id": np.arange(rows, dtype=np.int64),
        "text": [f"product {i} in colour {rng.integers(0, 50)} size {rng.integers(0, 9)}" for i in range(rows)],
        "uri": [f"s3://bench/images/{i % 1000:05d}.jpg" for i in range(rows)],
        "price": rng.random(rows),
    })


def _backend_round(backend: str, table: pa.Table, images: list[str]) -> dict:
    from pipelines.storage import locate, read_uris

    target = locate(f"s3://bench/{backend}/catalog.parquet", backend=backend)
    started = time.perf_counter()
    pq.write_table(table, target.path, filesystem=target.filesystem)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    back = pq.read_table(target.path, filesystem=target.filesystem)
    read_s = time.perf_counter() - started
    assert back.num_rows == table.num_rows
    os.environ["BLIP_MODERATE_STORAGE_BACKEND"] = backend
    started = time.perf_counter()
    got = read_uris(images, limit=50 * 1024 * 1024)
    images_s = time.perf_counter() - started
    assert all(isinstance(g, bytes) for g in got)
    return {"write_s": write_s, "read_s": read_s, "images_s": images_s}


def backends(rows: int, image_count: int, rounds: int) -> dict:
    from blip_ops.samples import draw_shape
    from tests.s3_server import running_s3

    work = Path(tempfile.mkdtemp(prefix="storage-backends-"))
    (work / "cache").mkdir()
    table = _catalog(rows)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    size_mb = len(buffer.getvalue()) / 1e6
    with running_s3(work / "cache") as s3:
        os.environ["AWS_ENDPOINT_URL_S3"] = s3.endpoint  # moto itself: no proxy in the measured path
        s3.create_bucket("bench")
        images = [s3.put(f"s3://bench/images/{i:05d}.jpg", draw_shape("red", "circle", size=(640, 480))) for i in range(image_count)]
        results = {"native": [], "fsspec": []}
        for _ in range(rounds):
            for backend in results:
                results[backend].append(_backend_round(backend, table, images))
    summary = {}
    for backend, runs in results.items():
        summary[backend] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        summary[backend]["images_per_s"] = round(image_count / summary[backend]["images_s"], 1)
    return {"rows": rows, "parquet_mb": round(size_mb, 1), "images": image_count, "rounds": rounds, "median": summary,
            "all": results}


def http(urls: int, latency: float) -> dict:
    from blip_ops.samples import draw_shape
    from pipelines.storage import HttpSettings, read_uris
    from tests.http_server import Answer, FaultServer

    body = draw_shape("red", "circle", size=(640, 480))
    out = {}
    with FaultServer(latency=latency) as server:
        for label, settings in (
            ("concurrency 1", HttpSettings(concurrency=1, per_host=1, allow_private=True)),
            ("concurrency 4", HttpSettings(concurrency=4, per_host=4, allow_private=True)),
            ("defaults (16 threads, 4 per host)", HttpSettings(allow_private=True)),
            ("16 threads, 16 per host", HttpSettings(concurrency=16, per_host=16, allow_private=True)),
        ):
            names = [server.route(f"/{len(out)}-{i}.jpg", Answer(body=body)) for i in range(urls)]
            started = time.perf_counter()
            got = read_uris(names, http=settings)
            seconds = time.perf_counter() - started
            errors = [str(g) for g in got if not isinstance(g, bytes)]
            out[label] = {"seconds": round(seconds, 3), "urls_per_s": round(urls / seconds, 1), "errors": len(errors),
                          "first_error": errors[0] if errors else None}
    return {"urls": urls, "latency_s": latency, "bytes_per_image": len(body), "results": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--urls", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--json", help="Write the raw results here.")
    args = parser.parse_args(argv)
    result = {"load_before": os.getloadavg(), "backends": backends(args.rows, args.images, args.rounds),
              "http": http(args.urls, args.latency), "load_after": os.getloadavg()}
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "backends"} | {"backends": result["backends"]["median"],
                      "parquet_mb": result["backends"]["parquet_mb"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
