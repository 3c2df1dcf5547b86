"""This round's levers on the CPU: overlapped batches in the score stage, and bf16 weights' drift.

    python -m benchmarks.levers_cpu [--rows 512] [--width 384 --depth 6] [--json]

Overlap: the score stage (``pipelines.dataflow.stages.ScoreStage``, no Ray) over decoded batches
of the CPU default size (64), one call at a time against two threads calling it at once (what
``max_concurrent_calls_per_actor=2`` does), with torch on every core as a default CPU actor is.
Drift: ITC and ITM of the same pairs in fp32, bf16 autocast and bf16 weights. Both on a
random-weight BLIP-base-layout checkpoint (``blip_ops.tiny.build_bench_itm``) and the catalog of
``benchmarks.cpu_bench`` (480x360 JPEGs of drawn shapes, distinct titles).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _decoded_batches(checkpoint: str, rows: int, batch: int, workdir: Path):
    from benchmarks.cpu_bench import write_catalog
    from pipelines.dataflow.stages import decode_batch

    table = pq.read_table(write_catalog(workdir / "catalog", rows, rows_per_group=rows, distinct=True) / "catalog.parquet")
    return [decode_batch(table.slice(i, batch), text_column="text", image_column="image", from_uri=False,
                         score_model=checkpoint, caption_model=None) for i in range(0, rows, batch)]


def overlap(checkpoint: str, batches, threads: int) -> dict:
    import torch

    from pipelines.dataflow.stages import ScoreStage

    stage = ScoreStage(model=checkpoint, device="cpu", max_text_tokens=35, text_column="text", threads=threads)
    stage(batches[0])  # warm-up
    rows = sum(b.num_rows for b in batches)
    result = {"torch_threads": torch.get_num_threads()}
    for calls in (1, 2) * 3:  # interleaved, so drifting load hits both alike
        started = time.perf_counter()
        if calls == 1:
            outputs = [stage(b) for b in batches]
        else:
            with ThreadPoolExecutor(calls) as pool:
                outputs = list(pool.map(stage, batches))
        seconds = time.perf_counter() - started
        result.setdefault(f"pairs_per_s_calls_{calls}", []).append(round(rows / seconds, 2))
        result.setdefault("itc", {})[calls] = np.concatenate([o.column("itc_score").to_numpy() for o in outputs])
    equal = bool(np.array_equal(result["itc"][1], result["itc"][2]))
    del result["itc"]
    result["same_scores"] = equal
    # Each two-call pass against the one-call pass just before it (the load drifts between pairs).
    ratios = [b / a for a, b in zip(result["pairs_per_s_calls_1"], result["pairs_per_s_calls_2"])]
    result["two_calls_over_one_per_pair"] = [round(r, 3) for r in ratios]
    result["median_ratio"] = round(float(np.median(ratios)), 3)
    return result


def pipeline_overlap(checkpoint: str, workdir: Path, rows: int, repeats: int = 2) -> dict:
    """``python -m jobs.score`` at its CPU defaults (scoring only), ``--overlap off`` against ``on``,
    each a fresh process, alternating; rows/s from the run summary and the steady rate of its progress lines."""
    import os
    import subprocess
    import sys

    from benchmarks.cpu_bench import steady_rate, write_catalog

    catalog = write_catalog(workdir / "pipeline-catalog", rows, rows_per_group=64, distinct=True)
    out: dict = {"rows": rows}
    for index in range(repeats * 2):
        mode = ("off", "on")[index % 2]
        command = [sys.executable, "-m", "jobs.score", "--input", str(catalog), "--output", str(workdir / f"out-{index}"),
                   "--itm-model", checkpoint, "--caption-model", "none", "--device", "cpu", "--overlap", mode, "--json"]
        env = dict(os.environ, BLIP_MODERATE_PROGRESS_INTERVAL_S="5")
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        steady = steady_rate(result.stderr)
        out.setdefault(mode, []).append({"wall_s": round(time.perf_counter() - started, 1),
                                         "steady_pairs_per_s": steady and steady["pairs_per_s"],
                                         "load": _load()})
    return out


def drift(checkpoint: str, batches) -> dict:
    from blip_ops.scorer import BlipScorer
    from pipelines.dataflow.stages import _pixel_batch, _scorable
    from pipelines import schema as S

    scores = {}
    for precision in ("fp32", "bf16", "bf16-weights"):
        scorer = BlipScorer.from_pretrained(checkpoint, device="cpu", precision=precision)
        itc, itm = [], []
        for batch in batches:
            rows = np.flatnonzero(_scorable(batch))
            images = _pixel_batch(batch.column(S.PIXELS_SCORE), rows, scorer.images.resizer)
            texts = [batch.column("text")[int(i)].as_py() for i in rows]
            c, m, _ = scorer.score(images, texts)
            itc.append(c)
            itm.append(m)
        scores[precision] = (np.concatenate(itc), np.concatenate(itm))
    out = {}
    for precision in ("bf16", "bf16-weights"):
        for index, name in enumerate(("itc", "itm")):
            delta = np.abs(scores[precision][index] - scores["fp32"][index])
            out[f"{precision}_{name}_mean_abs"] = float(delta.mean())
            out[f"{precision}_{name}_max_abs"] = float(delta.max())
    out["fp32_itc_spread"] = float(scores["fp32"][0].std())
    out["fp32_itm_spread"] = float(scores["fp32"][1].std())
    return out


def main(argv: list[str] | None = None) -> int:
    from blip_ops.tiny import build_bench_itm, build_tiny_itm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="the CPU default score batch")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the stage (a default CPU actor: every core)")
    parser.add_argument("--skip-overlap", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument("--pipeline", action="store_true", help="also jobs.score end to end, --overlap off against on")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        mid = str(build_bench_itm(workdir / "mid", width=args.width, depth=args.depth))
        tiny = str(build_tiny_itm(workdir / "tiny"))
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": _load(),
                  "rows": args.rows, "batch_size": args.batch_size,
                  "checkpoint": {"layout": "BLIP-base", "width": args.width, "depth": args.depth, "image_size": 384}}
        batches = _decoded_batches(mid, args.rows, args.batch_size, workdir)
        if not args.skip_overlap:
            result["overlap"] = overlap(mid, batches, args.threads)
        if not args.skip_drift:
            result["drift_mid"] = drift(mid, batches)
            # The tiny checkpoint's weights are redrawn at unit gain: scores that vary from row to row.
            result["drift_tiny_unit_gain"] = drift(tiny, _decoded_batches(tiny, min(args.rows, 128), args.batch_size, workdir / "t"))
        if args.pipeline:
            result["pipeline"] = pipeline_overlap(mid, workdir, args.rows)
        result["load_after"] = _load()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
