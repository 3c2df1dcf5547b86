"""What caption agreement and the language check add, on the CPU.

    python -m benchmarks.agreement_cost              # about 5 minutes on 2 cores
    python -m benchmarks.agreement_cost --rows 128   # a quick look

Two parts:

* **steps alone**, in this process: seconds per 1,000 rows of the all-MiniLM-L6-v2 agreement
  pass (text and cleaned caption, fp32, the real weights) and of py3langid's detection, with
  torch's default threads and with one thread (what a one-CPU caption actor gets).
* **the pipeline**, ``run_job`` on a local Ray, the same catalog four times: agreement off/on
  times the language check off (``any``)/on (``en``). Scoring uses a random-weight BLIP-base-
  layout ITM checkpoint at reduced width and depth, as ``benchmarks.cpu_bench``; captioning uses
  the tiny random BLIP-2 of the tests (a real BLIP-2 takes seconds a caption on the CPU, so next
  to it agreement's share is far smaller than here: these pipeline figures are an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def steps_alone(workdir: Path, rows: int = 1000) -> dict:
    import numpy as np
    import torch

    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import build_bench_itm

    from blip_ops.agreement import DEFAULT_AGREEMENT_MODEL, SentenceEncoder, agreement
    from blip_ops.language import detect_languages

    texts = [f"Men's waterproof hiking boots, size {i % 13 + 36}, brown leather" for i in range(rows)]
    captions = [f"a photo of a pair of brown boots on a rock number {i}" for i in range(rows)]
    encoder = SentenceEncoder.from_pretrained(DEFAULT_AGREEMENT_MODEL)
    result = {}
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        agreement(encoder, texts[:64], captions[:64])
        started = time.perf_counter()
        agreement(encoder, texts, captions)
        result[f"agreement_s_per_1000_threads_{threads}"] = round((time.perf_counter() - started) * 1000 / rows, 3)
    detect_languages(texts[:8])
    started = time.perf_counter()
    detect_languages(texts)
    result["language_s_per_1000"] = round((time.perf_counter() - started) * 1000 / rows, 3)
    # The scoring step at the same moment (the same load), for scale: ITC+ITM on the
    # cpu_bench checkpoint, batches of 64 at model resolution, one and two threads.
    scorer = BlipScorer.from_pretrained(str(build_bench_itm(workdir / "itm-steps", width=256, depth=4)), device="cpu",
                                        precision="fp32")
    side = scorer.images.height
    images = np.random.RandomState(0).randint(0, 256, (64, 3, side, side), dtype=np.uint8)
    for threads in (2, 1):
        torch.set_num_threads(threads)
        scorer.score(images[:8], texts[:8])
        started = time.perf_counter()
        for _ in range(2):
            scorer.score(images, texts[:64])
        result[f"scoring_s_per_1000_threads_{threads}"] = round((time.perf_counter() - started) * 1000 / 128, 3)
    return result


def pipeline_runs(rows: int, workdir: Path) -> list[dict]:
    import ray

    from benchmarks.cpu_bench import write_catalog
    from blip_ops.tiny import build_bench_itm, build_tiny_checkpoints
    from pipelines.config import build_config
    from pipelines.run import run_job

    catalog = write_catalog(workdir / "catalog", rows, rows_per_group=64)
    itm = str(build_bench_itm(workdir / "itm", width=256, depth=4))
    _, caption = build_tiny_checkpoints(workdir / "tiny")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results = []
    # Interleaved, so a change in the machine's load falls on both sides of each comparison.
    for agreement, languages in ((False, "any"), (True, "any"), (False, "en"), (True, "en")):
        if True:
            config = build_config({
                "input": str(catalog), "output": str(workdir / f"out-{agreement}-{languages}"), "itm_model": itm,
                "caption_model": str(caption), "device": "cpu", "precision": "fp32", "max_new_tokens": 8,
                "agreement_model": None if not agreement else "sentence-transformers/all-MiniLM-L6-v2",
                "text_languages": languages,
            })
            started = time.perf_counter()
            summary = run_job(config)
            elapsed = time.perf_counter() - started
            results.append({"agreement": agreement, "text_languages": languages, "rows": summary.rows_read,
                            "seconds": round(elapsed, 1), "pairs_per_s": round(summary.rows_read / elapsed, 2),
                            "load_average": [round(x, 2) for x in os.getloadavg()]})
            print(json.dumps(results[-1]), flush=True)
    ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps-only", action="store_true")
    args = parser.parse_args(argv)
    before = [round(x, 2) for x in os.getloadavg()]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "load_average_before": before}
    with tempfile.TemporaryDirectory() as tmp:
        result["steps"] = steps_alone(Path(tmp))
        result["load_average_after_steps"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result["steps"]), flush=True)
        if not args.steps_only:
            result["pipeline"] = pipeline_runs(args.rows, Path(tmp))
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
