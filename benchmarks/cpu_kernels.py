"""oneDNN against torch's own kernels for the CPU scorer's image side: the drift and the time.

    python -m benchmarks.cpu_kernels            # about 3 minutes on 2 cores
    python -m benchmarks.cpu_kernels --smoke    # tiny shapes (run by the tests)
    python -m benchmarks.cpu_kernels --gemm-only --gemm-repeats 40   # the GEMM table alone, about 1 minute

Why it exists: ``cpu_kernels=auto`` puts the vision encoder's and the cross-attention's image
projections on oneDNN (``blip_ops.cpu_kernels``) by default on x86-64, and a default that moves
numbers must say by how much. From one process:

* **GEMM throughput** at the vision encoder's four projection shapes (one CPU chunk: 8 images x
  577 tokens), one thread, torch's ``linear`` (MKL here) against the prepacked oneDNN kernel.
* **drift**: ITC and ITM of the same pairs scored on each, beside the fused attention's drift
  (the other default that sums in another order) and the batch-size noise. Weights redrawn at
  unit gain (``blip_ops.tiny.redraw_at_unit_gain``) so scores spread as a trained model's do;
  the CPU benchmark's catalog, decoded and resized as the pipeline does.
* **time** of a whole ``BlipScorer.score`` call per batch, each side interleaved round by round,
  medians: CPU seconds at one torch thread, and wall seconds on the actor's layout (2 chunk
  workers of one thread each, as a default CPU scoring actor on 2 cores runs).
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

SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]  # qkv, projection, fc1, fc2 at width 384


def gemm_gflops(rows: int, shapes, repeats: int) -> list[dict]:
    """Each kernel timed right after the other, call by call: the per-call ratio's median holds on
    a busy machine, where best-of GFLOP/s alone would say more about the neighbours."""
    import torch

    from blip_ops.cpu_kernels import PackedLinear

    results = []
    for width, out in shapes:
        linear = torch.nn.Linear(width, out)
        packed = PackedLinear(linear)
        x = torch.randn(rows, width)
        flops = 2 * rows * width * out
        seconds = {"torch": [], "onednn": []}
        with torch.inference_mode():
            linear(x), packed(x)
            for _ in range(repeats):
                for name, fn in (("torch", linear), ("onednn", packed)):
                    started = time.perf_counter()
                    fn(x)
                    seconds[name].append(time.perf_counter() - started)
            same_bits = torch.equal(linear(x), packed(x))
        results.append({
            "shape": f"{rows}x{width} @ {width}x{out}",
            "torch_gflops": round(flops / statistics.median(seconds["torch"]) / 1e9, 1),
            "onednn_gflops": round(flops / statistics.median(seconds["onednn"]) / 1e9, 1),
            "torch_over_onednn_median": round(statistics.median(t / o for t, o in zip(seconds["torch"], seconds["onednn"])), 3),
            "same_bits": same_bits,
        })
    return results


def measure(args) -> dict:
    import numpy as np
    import torch

    from benchmarks.samples import catalog_pairs
    from blip_ops.cpu_kernels import pack_image_side
    from blip_ops.preprocess import resize_for
    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import build_bench_itm, build_tiny_itm, redraw_at_unit_gain

    torch.set_num_threads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blip-cpu-kernels-"))
    checkpoint = build_tiny_itm(workdir / "itm") if args.smoke else build_bench_itm(workdir / "itm", width=args.width, depth=args.depth)

    def scorer(kernels: str, attention: str = "fused", workers: int = 1) -> BlipScorer:
        # Redrawn before packing: the packed weights are the unit-gain ones.
        s = BlipScorer.from_pretrained(str(checkpoint), device="cpu", cpu_kernels="torch", vision_attention=attention,
                                       chunk_workers=workers)
        redraw_at_unit_gain(s.model, seed=0)
        if kernels == "onednn":
            pack_image_side(s.model)
            s.cpu_kernels = "onednn"
        return s

    images, texts = catalog_pairs(workdir, args.rows, resize_for(str(checkpoint)))

    def scores(s: BlipScorer, batch: int):
        parts = [s.score(images[i : i + batch], texts[i : i + batch]) for i in range(0, len(texts), batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def worst(a, b) -> dict:
        return {"itc": float(np.abs(a[0] - b[0]).max()), "itm": float(np.abs(a[1] - b[1]).max())}

    big, small = args.batch_size, max(1, args.batch_size // 4)
    exact, fast = scorer("torch"), scorer("onednn")
    torch_scores, onednn_scores = scores(exact, big), scores(fast, big)
    eager_scores = scores(scorer("torch", attention="eager"), big)
    drift = {
        "onednn_vs_torch": worst(onednn_scores, torch_scores),
        "fused_attention_vs_eager": worst(torch_scores, eager_scores),
        "onednn_and_fused_vs_eager": worst(onednn_scores, eager_scores),
        "batch_noise_torch": worst(torch_scores, scores(exact, small)),
    }

    def cpu_seconds(fn) -> float:
        started = time.process_time()
        fn()
        return time.process_time() - started

    def wall_seconds(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    batch, batch_texts = images[:big], texts[:big]
    actor_like = {"torch": scorer("torch", workers=args.workers), "onednn": scorer("onednn", workers=args.workers)}
    timings = {"score_cpu_s_torch": [], "score_cpu_s_onednn": [], "score_wall_s_torch": [], "score_wall_s_onednn": []}
    for s in (exact, fast, *actor_like.values()):
        s.score(batch[:2], batch_texts[:2])  # warm
    for _ in range(args.rounds):
        for name, s in (("torch", exact), ("onednn", fast)):
            timings[f"score_cpu_s_{name}"].append(cpu_seconds(lambda: s.score(batch, batch_texts)))
        for name, s in actor_like.items():
            timings[f"score_wall_s_{name}"].append(wall_seconds(lambda: s.score(batch, batch_texts)))
    median = {name: round(statistics.median(values), 4) for name, values in timings.items()}
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "checkpoint": "tiny" if args.smoke else {"width": args.width, "depth": args.depth, "image_size": 384},
        "pairs": len(texts),
        "batch_size": big,
        "chunk_workers_for_wall": args.workers,
        "gemm_one_thread": gemm_gflops(8 * 577 if not args.smoke else 64, SHAPES if not args.smoke else SHAPES[:1],
                                       args.gemm_repeats),
        "itm_range": [float(torch_scores[1].min()), float(torch_scores[1].max())],
        "drift": drift,
        "median": median,
        "cpu_saving": round(1 - median["score_cpu_s_onednn"] / median["score_cpu_s_torch"], 3),
        "wall_speedup": round(median["score_wall_s_torch"] / median["score_wall_s_onednn"], 2),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="chunk workers for the wall-time figure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gemm-repeats", type=int, default=20)
    parser.add_argument("--workdir")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint, few rows: checks the script runs")
    parser.add_argument("--gemm-only", action="store_true", help="only the GEMM throughput at the four shapes (about 1 minute)")
    args = parser.parse_args(argv)
    if args.gemm_only:
        import torch

        torch.set_num_threads(1)
        print(json.dumps({"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                          "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
                          "gemm_one_thread": gemm_gflops(8 * 577, SHAPES, args.gemm_repeats)}, indent=2))
        return
    if args.smoke:
        args.rows, args.batch_size, args.rounds, args.gemm_repeats = min(args.rows, 8), min(args.batch_size, 4), 1, 2
    print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main()
