"""What --near-duplicates costs: the grouping passes (``pipelines.dataflow.neardup``) over N synthetic
rows, with recall and precision against brute force.

Synthetic embeddings (the grouping stage reads only ``image_sha256`` and ``image_embedding``, so the
scoring pass is not re-measured here): unit vectors in D = 256 with planted families of near copies
(10% of the images get 1-3 copies at cosine 0.93-0.995 to their original, the spread resized,
re-encoded and cropped copies show), plus exact copies (the same hash in other rows, 10%). Unrelated
images are independent random directions (cosine near 0); real BLIP embeddings of unrelated photos are
less spread, which raises the candidate count (BENCHMARKS.md works it out).

    python -m benchmarks.neardup_bench --rows 50000 200000 --recall-images 20000 --out bench-neardup.json

Peak memory: the driver's VmHWM, and the largest VmHWM of Ray's worker processes (each runs one
task at a time, so it bounds a task's peak), read from /proc after each size on a fresh Ray.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import keys as K
from pipelines import schema as S
from pipelines import vectors
from pipelines.dataflow import neardup

DIM = 256
PIECE_ROWS = 10_000


def planted(images: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    originals = int(images / 1.2)
    base = rng.standard_normal((originals, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    shas = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(originals)]
    vecs = [base]
    extra = []
    families = rng.choice(originals, size=images - originals, replace=True)
    for n, origin in enumerate(families):
        target = rng.uniform(0.93, 0.995)
        noise = rng.standard_normal(DIM).astype(np.float32)
        noise -= (noise @ base[origin]) * base[origin]
        noise /= np.linalg.norm(noise)
        extra.append(target * base[origin] + np.sqrt(1 - target ** 2) * noise)
        shas.append(hashlib.sha256(f"{seed}-copy-{n}".encode()).hexdigest())
    vecs.append(np.array(extra, dtype=np.float32).reshape(-1, DIM))
    return shas, np.concatenate(vecs).astype(np.float16)


def write_rows(directory: Path, rows: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    images = int(rows / 1.1)  # 10% of rows repeat an image (the same file in another listing)
    shas, vecs = planted(images, seed)
    rng = np.random.default_rng(seed + 1)
    index = np.concatenate([np.arange(images), rng.integers(0, images, rows - images)])
    rng.shuffle(index)
    paths = []
    for piece, start in enumerate(range(0, rows, PIECE_ROWS)):
        part = index[start:start + PIECE_ROWS]
        table = pa.table({K.IMAGE_SHA256: pa.array([shas[i] for i in part], pa.string()),
                          S.IMAGE_EMBEDDING: vectors.fixed_array(vecs[part])})
        path = str(directory / f"u{piece:06d}-r0000000000-n{len(part):06d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths, shas, vecs


def _hwm_kib(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_worker_peaks() -> list[int]:
    peaks = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and "IDLE" in cmdline or cmdline.startswith("ray::_run_one"):
            peaks.append(_hwm_kib(pid))
    return peaks


def measure(rows: int, seed: int) -> dict:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "pieces").mkdir()
            paths, _, _ = write_rows(root / "pieces", rows, seed)
            driver_before = _hwm_kib("self")
            started = time.perf_counter()
            counts = neardup.group_near_duplicates(paths, pafs.LocalFileSystem(), str(root / "work"), rows=rows, dim=DIM,
                                                   threshold=0.95)
            wall = time.perf_counter() - started
            peaks = ray_worker_peaks()
            return {"rows": rows, "wall_s": round(wall, 2), "counts": counts,
                    "driver_hwm_mib_before": round(driver_before / 1024, 1),
                    "driver_hwm_mib_after": round(_hwm_kib("self") / 1024, 1),
                    "worker_hwm_mib_max": round(max(peaks, default=0) / 1024, 1), "workers_seen": len(peaks)}
    finally:
        ray.shutdown()


def recall(images: int, seed: int) -> dict:
    """Pair recall and precision of the grouping's edges against brute force over ``images`` images."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            shas, vecs = planted(images, seed)
            (root / "pieces").mkdir()
            table = pa.table({K.IMAGE_SHA256: pa.array(shas, pa.string()), S.IMAGE_EMBEDDING: vectors.fixed_array(vecs)})
            path = str(root / "pieces" / "u000000-r0000000000-n000001.parquet")
            pq.write_table(table, path)
            counts = neardup.group_near_duplicates([path], pafs.LocalFileSystem(), str(root / "work"), rows=images,
                                                   dim=DIM, threshold=0.95)
            edges = neardup._read_edges(pafs.LocalFileSystem(), str(root / "work"), counts["buckets"])
            found = {tuple(sorted(p)) for p in zip(edges.column("sha_a").to_pylist(), edges.column("sha_b").to_pylist())}
            started = time.perf_counter()
            truth = neardup.brute_force_pairs(shas, vecs, 0.95)
            brute_s = time.perf_counter() - started
            hit = len(found & truth)
            return {"images": images, "true_pairs": len(truth), "found_pairs": len(found), "recall": hit / max(1, len(truth)),
                    "precision": hit / max(1, len(found)), "brute_force_s": round(brute_s, 2), "counts": counts}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--recall-images", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), platform.processor())
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": model, "cores": os.cpu_count(),
              "load_before": os.getloadavg(), "sizes": [], "recall": None}
    if args.recall_images:
        result["recall"] = recall(args.recall_images, args.seed)
        print(json.dumps(result["recall"]), flush=True)
    for rows in args.rows:
        result["sizes"].append(measure(rows, args.seed))
        print(json.dumps(result["sizes"][-1]), flush=True)
    result["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
