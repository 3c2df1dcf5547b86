"""Host time a model actor spends gathering one batch's pixels from Arrow, before and after the
zero-copy path for whole single-chunk batches (``pipelines.dataflow.stages._pixel_batch``).

    python -m benchmarks.pixel_batch [--rows 256] [--side 384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from blip_ops.preprocess import Resize
from pipelines.dataflow.stages import _pixel_batch


def _median_ms(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per batch (the GPU default)")
    parser.add_argument("--side", type=int, default=384, help="model input side (BLIP ITM: 384)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    size = Resize(args.side, args.side, 3)
    pixels = np.random.default_rng(0).integers(0, 256, (args.rows, size.num_bytes), dtype=np.uint8)
    column = pa.chunked_array([pa.array([row.tobytes() for row in pixels], pa.binary())])
    rows = np.arange(args.rows)
    before = _median_ms(lambda: column.take(pa.array(rows, pa.int64())).combine_chunks(), args.repeats)
    now = _median_ms(lambda: _pixel_batch(column, rows, size), args.repeats)
    subset = _median_ms(lambda: _pixel_batch(column, rows[::2], size), args.repeats)
    megabytes = args.rows * size.num_bytes / 2**20
    print(f"{args.rows} rows at {args.side}px ({megabytes:.0f} MiB): gather and copy (before) {before} ms; "
          f"whole batch now {now} ms; half the rows (still gathered) {subset} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
