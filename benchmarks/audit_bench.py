"""Notebook audit latency: the batch pipeline against warm model actors, same 50 rows.

    python -m benchmarks.audit_bench

Tiny random checkpoints (built on the spot), captions on, a local Ray of 2 CPUs; prints the
seconds of each call: two through the batch pipeline, then three warm calls (the first one
starts the actors and loads the models).
"""

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import ray  # noqa: E402

from blip_ops.samples import sample_catalog  # noqa: E402
from blip_ops.tiny import build_tiny_checkpoints  # noqa: E402
from jobs.audit import audit, release_models  # noqa: E402


def main() -> None:
    itm, caption = build_tiny_checkpoints(tempfile.mkdtemp())
    records = sample_catalog(50, seed=1)
    for record in records:
        record.pop("expected")
    frame = pd.DataFrame(records)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    options = dict(itm_model=str(itm), caption_model=str(caption), device="cpu", max_new_tokens=8)
    for label, warm in [("batch pipeline", False), ("batch pipeline", False), ("warm (first)", True), ("warm", True), ("warm", True)]:
        started = time.perf_counter()
        audit(frame, warm_models=warm, **options)
        print(f"{label}: {time.perf_counter() - started:.2f} s", flush=True)
    release_models()


if __name__ == "__main__":
    main()
