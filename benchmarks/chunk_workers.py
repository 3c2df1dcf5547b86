"""CPU chunks side by side (``BlipScorer.chunk_workers``) against one chunk at a time.

    python -m benchmarks.chunk_workers [--rows 256] [--width 384 --depth 6] [--json]

The score stage (``pipelines.dataflow.stages.ScoreStage``, no Ray) over decoded batches of the CPU
default size (64), as a default CPU actor on 2 cores runs it: torch on both cores, evidence for
flagged rows (on this random-weight checkpoint every row is flagged) and for none. **before**: the
8-row chunks one at a time, each op on both threads; **after**: the chunks on two worker threads,
each op on one (the default since 2026-12-01). Rounds interleaved, so a drifting load hits both
sides alike; wall and process CPU seconds per round. The process starts as Ray starts a 1-CPU
actor, with ``OMP_NUM_THREADS=1`` in its environment (``--no-ray-env`` leaves it unset). Same
checkpoint and catalog as ``benchmarks.cpu_bench`` (``blip_ops.tiny.build_bench_itm``, 480x360
JPEGs, distinct titles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _stage(checkpoint: str, evidence: str, side_by_side: bool):
    from pipelines.dataflow.stages import ScoreStage

    stage = ScoreStage(model=checkpoint, device="cpu", max_text_tokens=35, text_column="text", threads=2, evidence=evidence)
    if not side_by_side:  # what every CPU actor ran before chunk workers
        stage.scorer._chunk_pool, stage.scorer.chunk_workers = None, 1
    return stage


def _threads(name: str) -> None:
    # One process holds both sides, and torch's threads are process-wide: each side gets its own.
    import torch

    torch.set_num_threads(2 if name == "before" else 1)


def measure(checkpoint: str, batches, rounds: int) -> dict:
    rows = sum(b.num_rows for b in batches)
    result = {}
    for evidence in ("flagged", "none"):
        stages = {"before": _stage(checkpoint, evidence, False), "after": _stage(checkpoint, evidence, True)}
        scores = {}
        for name, stage in stages.items():
            _threads(name)
            stage(batches[0])  # warm-up
        for _ in range(rounds):
            for name, stage in stages.items():
                _threads(name)
                cpu, started = os.times(), time.perf_counter()
                outputs = [stage(b) for b in batches]
                wall, cpu_after = time.perf_counter() - started, os.times()
                entry = result.setdefault(f"evidence_{evidence}", {}).setdefault(name, {"wall_s": [], "cpu_s": []})
                entry["wall_s"].append(round(wall, 2))
                entry["cpu_s"].append(round(cpu_after.user + cpu_after.system - cpu.user - cpu.system, 2))
                scores[name] = np.concatenate([o.column("itm_score").to_numpy() for o in outputs])
        side = result[f"evidence_{evidence}"]
        for name in stages:
            side[name]["pairs_per_s_median"] = round(rows / float(np.median(side[name]["wall_s"])), 2)
        side["speedup_median"] = round(float(np.median(side["before"]["wall_s"]) / np.median(side["after"]["wall_s"])), 3)
        side["max_itm_difference"] = float(np.abs(scores["before"] - scores["after"]).max())
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-ray-env", action="store_true", help="leave OMP_NUM_THREADS unset (Ray sets it to 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.no_ray_env and "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = "1"
    from benchmarks.levers_cpu import _decoded_batches
    from blip_ops.tiny import build_bench_itm

    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="blip-chunk-workers-") as tmp:
        workdir = Path(tmp)
        checkpoint = str(build_bench_itm(workdir / "itm", width=args.width, depth=args.depth))
        batches = _decoded_batches(checkpoint, args.rows, 64, workdir)
        result = {"rows": args.rows, "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "batch": 64, "width": args.width, "depth": args.depth, "rounds": args.rounds,
                  **measure(checkpoint, batches, args.rounds)}
    result["load_before"], result["load_after"] = load_before, _load()
    result["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for key in ("evidence_flagged", "evidence_none"):
        side = result[key]
        print(f"{key}: before {side['before']['pairs_per_s_median']} pairs/s, after {side['after']['pairs_per_s_median']} "
              f"pairs/s ({side['speedup_median']}x), max ITM difference {side['max_itm_difference']:.1e}")
    print(f"load average before {result['load_before']} after {result['load_after']}")


if __name__ == "__main__":
    main()
