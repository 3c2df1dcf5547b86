"""Where a run's start-up goes, before its first scored row, step by step in a fresh process.

    python -m benchmarks.startup [--checkpoint DIR]   # default: the mid-size bench checkpoint

Steps, each timed on its own: the driver's imports (the CLI, then Ray), starting a local Ray
the way ``jobs.score`` does, a first task (a worker process starting and importing the
decode stage), and a scoring actor: the process start, its torch and transformers imports,
and the model load. On a real run the decode tasks' start and the actor's start overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _decode_worker_ready() -> float:
    started = time.perf_counter()
    import pipelines.dataflow.stages  # noqa: F401  (what a decode task imports)

    return time.perf_counter() - started


class _ActorProbe:
    def __init__(self):
        self.started = time.perf_counter()

    def load(self, checkpoint: str, threads: int) -> dict:
        begin = time.perf_counter()
        import torch  # noqa: F401
        import transformers  # noqa: F401

        imported = time.perf_counter()
        from pipelines.dataflow.stages import ScoreStage

        ScoreStage(model=checkpoint, device="cpu", max_text_tokens=35, text_column="text", threads=threads)
        loaded = time.perf_counter()
        return {"actor_imports_s": round(imported - begin, 2), "actor_model_load_s": round(loaded - imported, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="ITM checkpoint directory (default: build the mid-size bench one)")
    args = parser.parse_args(argv)
    steps = {}

    t = time.perf_counter()
    import jobs.score  # noqa: F401
    from pipelines.run import run_job  # noqa: F401  (the driver's imports before Ray starts)

    steps["driver_imports_s"] = time.perf_counter() - t
    t = time.perf_counter()
    import ray

    from pipelines.dataflow import runtime

    steps["ray_import_s"] = time.perf_counter() - t
    checkpoint = args.checkpoint
    if checkpoint is None:
        from blip_ops.tiny import build_bench_itm

        checkpoint = str(build_bench_itm(tempfile.mkdtemp(prefix="blip-startup-") + "/itm"))
    t = time.perf_counter()
    runtime.connect(None)
    steps["ray_start_s"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        import_s = ray.get(ray.remote(_decode_worker_ready).options(num_cpus=1).remote())
        steps["first_task_s"] = time.perf_counter() - t
        steps["first_task_import_s"] = import_s
        t = time.perf_counter()
        actor = ray.remote(_ActorProbe).options(num_cpus=1).remote()
        ray.get(actor.__ray_ready__.remote())
        steps["actor_process_start_s"] = time.perf_counter() - t
        steps.update(ray.get(actor.load.remote(checkpoint, int(runtime.cluster_cpus()))))
    finally:
        ray.shutdown()
    result = {k: round(v, 2) for k, v in steps.items()}
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    result["total_s_excluding_checkpoint_build"] = round(sum(v for k, v in steps.items() if k != "first_task_import_s"), 2)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
