"""Nightly cost follows what changed: day 1 with and without dedup, day 2 with reuse and fresh.

Day 1 is a snapshot of ``--rows`` listings in which a quarter of the images are shared by two to
five listings; day 2 is the same snapshot with 5% of rows changed (2% new images, 2% new texts,
1% new rows) and 1% deleted. Four runs of ``pipelines.run.run_job`` from one process, on one
local Ray, report rows read, pairs sent to the scorer, images sent to the captioner, model-stage
seconds (time inside the scoring and captioning actors' calls, summed over actors) and wall
seconds, then check that day 2 with reuse equals day 2 scored fresh.

The scorer is a BLIP-base-layout checkpoint shrunk to ``--width``/``--depth`` at ``--image-size``
(random weights: the cost of a real pair in miniature), the captioner the tiny BLIP-2. Run:
``python -m benchmarks.nightly_reuse --rows 2000``; the machine's load average is recorded
before and after, as the shared 2-core machines are never idle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from blip_ops.samples import COLORS, SHAPES, draw_shape


def _load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def catalogs(rows: int, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    rng = random.Random(seed)

    def image():
        return draw_shape(rng.choice(list(COLORS)), rng.choice(SHAPES), size=(rng.randint(60, 200), rng.randint(60, 200)))

    day1 = []
    while len(day1) < rows:
        picture = image()
        # A quarter of the images are shared by two to five listings.
        copies = rng.randint(2, 5) if rng.random() < 0.25 else 1
        for _ in range(copies):
            day1.append({"id": f"item-{len(day1):07d}", "text": f"a {rng.choice(list(COLORS))} {rng.choice(SHAPES)} #{len(day1)}",
                         "image": picture})
    day1 = day1[:rows]
    day2 = [dict(r) for r in day1]
    indices = list(range(rows))
    rng.shuffle(indices)
    n = rows // 100
    new_images, new_texts, deleted = indices[:2 * n], indices[2 * n:4 * n], set(indices[4 * n:5 * n])
    for i in new_images:
        day2[i]["image"] = image()
    for i in new_texts:
        day2[i]["text"] = day2[i]["text"] + " (edited)"
    day2 = [r for i, r in enumerate(day2) if i not in deleted]
    for k in range(n):
        day2.append({"id": f"new-{k:07d}", "text": f"a new listing {k}", "image": image()})
    uses = {}
    for r in day1:
        uses[id(r["image"])] = uses.get(id(r["image"]), 0) + 1
    shared = sum(1 for r in day1 if uses[id(r["image"])] > 1)
    return day1, day2, {"unique_images_day1": len(uses), "changed_images": 2 * n, "changed_texts": 2 * n, "new_rows": n, "deleted_rows": n,
                        "rows_with_a_shared_image_day1": shared}


def _stage_seconds(directory: Path) -> dict:
    totals = {"score": [0, 0.0], "caption": [0, 0.0]}
    for path in directory.glob("*.tsv"):
        for line in path.read_text().splitlines():
            stage, rows, seconds = line.split("\t")
            totals[stage][0] += int(rows)
            totals[stage][1] += float(seconds)
    return {f"{stage}_rows": v[0] for stage, v in totals.items()} | {f"{stage}_s": round(v[1], 2) for stage, v in totals.items()}


def plan_costs(rows: int, workdir: Path) -> dict:
    """Seconds per million rows of the keyed plan's CPU work, in one process without Ray: hashing
    image bytes (100 kB each) and texts, row keys, a bucket's plan against a source holding every
    key, and its distribution, on ``rows`` synthetic rows (one bucket)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipelines import keys as K
    from pipelines.reuse import passes as P

    fs = pafs.LocalFileSystem()
    work = str(workdir / "plan-work")
    blob = os.urandom(100_000)
    started = time.perf_counter()
    for i in range(2000):
        hashlib.sha256(blob).hexdigest()
    sha_per_image = (time.perf_counter() - started) / 2000
    images = pa.array([hashlib.sha256(str(i // 2).encode()).hexdigest() for i in range(rows)])
    texts = pa.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)])
    started = time.perf_counter()
    score_keys = K.score_keys("d" * 32, images, texts)
    keys_s = time.perf_counter() - started
    pos = pa.array(np.arange(rows, dtype=np.int64) | (np.arange(rows, dtype=np.int64) // 10_000 << 32))
    P._write(fs, f"{work}/sk/b00000/u.parquet", pa.Table.from_arrays([score_keys, pos], schema=P.KEY_POS_SCHEMA))
    offered = pa.table({P.KEY: score_keys, **{f.name: pa.nulls(rows, f.type) for f in P.SCORE_VALUE_FIELDS},
                        P.PRIO: pa.array(np.zeros(rows, dtype=np.int64))})
    P._write(fs, f"{work}/sr/b00000/s.parquet", offered)
    item = pa.Table.from_pylist([{"side": "score", "bucket": 0}])
    started = time.perf_counter()
    P.plan_bucket(item, work_fs=fs, work=work)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    P.distribute_bucket(item, work_fs=fs, work=work)
    distribute_s = time.perf_counter() - started
    per_million = 1e6 / rows
    return {"rows": rows, "sha256_100kB_image_ms": round(sha_per_image * 1e3, 3),
            "row_keys_s_per_M": round(keys_s * per_million, 2), "plan_bucket_s_per_M": round(plan_s * per_million, 2),
            "distribute_bucket_s_per_M": round(distribute_s * per_million, 2), "load": _load()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--workdir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plan-rows", type=int, help="only time the keyed plan's passes on this many synthetic rows")
    args = parser.parse_args(argv)
    if args.plan_rows:
        print(json.dumps(plan_costs(args.plan_rows, Path(args.workdir or tempfile.mkdtemp(prefix="plan-costs-")))))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nightly-reuse-"))
    times = workdir / "stage-times"
    times.mkdir(parents=True, exist_ok=True)
    os.environ["BLIP_MODERATE_STAGE_TIMES"] = str(times)  # before Ray starts: its workers inherit it

    from blip_ops.tiny import build_bench_itm, build_tiny_blip2
    from pipelines.config import build_config
    from pipelines.run import run_job
    from tests.conftest import write_catalog

    load_before = _load()
    itm = str(build_bench_itm(workdir / "itm", width=args.width, depth=args.depth, image_size=args.image_size))
    caption = str(build_tiny_blip2(workdir / "caption"))
    day1, day2, changes = catalogs(args.rows)
    write_catalog(workdir / "day1", day1, files=4)
    write_catalog(workdir / "day2", day2, files=4)

    import ray

    ray.init(include_dashboard=False, logging_level="ERROR")
    runs = {}
    plan = [("day1_dedup", "day1", {}), ("day1_no_dedup", "day1", {"dedup": False}),
            ("day2_reuse", "day2", {"reuse": str(workdir / "out-day1_dedup")}), ("day2_fresh", "day2", {})]
    for name, catalog, options in plan:
        for path in times.glob("*.tsv"):
            path.unlink()
        config = build_config(dict(input=str(workdir / catalog), output=str(workdir / f"out-{name}"), itm_model=itm,
                                   caption_model=caption, device="cpu", max_new_tokens=args.max_new_tokens, **options))
        started = time.monotonic()
        summary = run_job(config)
        wall = time.monotonic() - started
        runs[name] = dict(rows_read=summary.rows_read, wall_s=round(wall, 1), **summary.reuse, **_stage_seconds(times))
        print(name, json.dumps(runs[name]), flush=True)
    ray.shutdown()

    columns = ["id", "itc_score", "itm_score", "caption", "flagged", "flag_reasons", "status", "error", "text_truncated"]
    reused = {r["id"]: r for r in pq.read_table(workdir / "out-day2_reuse", columns=columns).to_pylist()}
    fresh = {r["id"]: r for r in pq.read_table(workdir / "out-day2_fresh", columns=columns).to_pylist()}
    worst = 0.0
    mismatches = 0
    for key, row in fresh.items():
        other = reused[key]
        for column in columns[1:]:
            if column in ("itc_score", "itm_score") and row[column] is not None:
                worst = max(worst, abs(row[column] - other[column]))
            elif other[column] != row[column]:
                mismatches += 1
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": args.rows, "changes": changes,
        "model": {"width": args.width, "depth": args.depth, "image_size": args.image_size, "max_new_tokens": args.max_new_tokens},
        "load_before": load_before, "load_after": _load(), "runs": runs,
        "day2_equal": {"same_ids": sorted(reused) == sorted(fresh), "non_score_mismatches": mismatches,
                       "max_abs_score_diff": worst},
        "day2_reuse_over_fresh_wall": round(runs["day2_reuse"]["wall_s"] / runs["day2_fresh"]["wall_s"], 3),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
