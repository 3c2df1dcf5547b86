"""Fused (SDPA) against eager vision attention in fp32 on the CPU: the drift and the CPU time.

    python -m benchmarks.attention_fp32            # about 2 minutes on 2 cores
    python -m benchmarks.attention_fp32 --smoke    # tiny shapes (run by the tests)

Why it exists: ``--vision-attention fused`` became the default in fp32 as well, and a default
that moves numbers must say by how much. Two figures, both from one process:

* **drift**: ITC and ITM of the same pairs scored with each attention, at two batch sizes
  (so the drift can be read beside the batch-size noise, which is zero here). A random-weight
  checkpoint straight from ``blip_ops.tiny`` has tiny activations (scores all near 0.5 and
  0.02), where any two orders of summation agree; the weights are therefore redrawn at unit
  gain (``blip_ops.tiny.redraw_at_unit_gain``, as the tests' tiny checkpoint is), which
  spreads ITM over most of (0, 1) as a trained model does.
  Images are the CPU benchmark's 480x360 product-style JPEGs, decoded and resized as the
  pipeline does.
* **CPU seconds** of the vision pass and of the whole ``BlipScorer.score`` call per batch, per
  attention, at one torch thread (CPU time, not wall time, so a shared machine's other users
  weigh less), interleaved round by round, medians kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def catalog_pairs(workdir: Path, rows: int, resize):
    """Decoded uint8 images and titles of the CPU benchmark's catalog, as the decode stage makes them."""
    import numpy as np
    import pyarrow.parquet as pq

    from benchmarks.cpu_bench import write_catalog
    from blip_ops.images import decode_rgb

    table = pq.read_table(write_catalog(workdir / "catalog", rows, rows_per_group=rows, distinct=True))
    images = np.stack([resize.resize(decode_rgb(b)) for b in table.column("image").to_pylist()])
    return images, table.column("text").to_pylist()


def measure(args) -> dict:
    import numpy as np
    import torch

    from blip_ops.attention import sdpa_vision_attention
    from blip_ops.preprocess import resize_for
    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import build_bench_itm, build_tiny_itm, redraw_at_unit_gain

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blip-attention-"))
    if args.smoke:
        checkpoint = build_tiny_itm(workdir / "itm")
    else:
        checkpoint = build_bench_itm(workdir / "itm", width=args.width, depth=args.depth)
    scorer = BlipScorer.from_pretrained(str(checkpoint), device="cpu", vision_attention="eager")
    redraw_at_unit_gain(scorer.model, seed=0)  # see the docstring: spread scores, as a trained model's
    images, texts = catalog_pairs(workdir, args.rows, resize_for(str(checkpoint)))

    def scores(fused: bool, batch: int):
        scorer.fused_attention = fused
        parts = [scorer.score(images[i : i + batch], texts[i : i + batch]) for i in range(0, len(texts), batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    big, small = args.batch_size, max(1, args.batch_size // 4)
    eager, eager_small, fused = scores(False, big), scores(False, small), scores(True, big)

    def worst(a, b) -> dict:
        return {"itc": float(np.abs(a[0] - b[0]).max()), "itm": float(np.abs(a[1] - b[1]).max())}

    batch = images[:big]
    pixels = scorer.images.to_device_pixel_values(batch, "cpu", torch.float32)
    timings = {"vision_eager": [], "vision_fused": [], "score_eager": [], "score_fused": []}

    def cpu_seconds(fn) -> float:
        started = time.process_time()
        fn()
        return time.process_time() - started

    with torch.inference_mode():
        for _ in range(args.rounds):
            timings["vision_eager"].append(cpu_seconds(lambda: scorer.model.vision_model(pixel_values=pixels)))
            with sdpa_vision_attention(scorer.model.vision_model):
                timings["vision_fused"].append(cpu_seconds(lambda: scorer.model.vision_model(pixel_values=pixels)))
    for _ in range(args.rounds):
        for fused_now, name in ((False, "score_eager"), (True, "score_fused")):
            scorer.fused_attention = fused_now
            timings[name].append(cpu_seconds(lambda: scorer.score(batch, texts[:big])))
    median = {name: round(statistics.median(values), 4) for name, values in timings.items()}

    def saving(fused_s: float, eager_s: float) -> float | None:
        return round(1 - fused_s / eager_s, 3) if eager_s > 0 else None

    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "checkpoint": "tiny" if args.smoke else {"width": args.width, "depth": args.depth, "image_size": 384},
        "pairs": len(texts),
        "batch_size": big,
        "threads": args.threads,
        "itm_range": [float(eager[1].min()), float(eager[1].max())],
        "drift_fused_vs_eager": worst(fused, eager),
        "batch_noise_eager": worst(eager, eager_small),
        "cpu_s_per_batch_median": median,
        "vision_saving": saving(median["vision_fused"], median["vision_eager"]),
        "score_saving": saving(median["score_fused"], median["score_eager"]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint, few rows: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.batch_size, args.rounds = min(args.rows, 8), min(args.batch_size, 4), 1
    print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main()
