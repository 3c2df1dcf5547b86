"""Issue 17's levers on a GPU, each against its baseline, at full size (random weights, real shapes).

    python -m benchmarks.gpu_levers --json                      # on a CUDA machine (about 5 minutes on an H200)
    python -m benchmarks.gpu_levers --smoke --json              # tiny shapes on the CPU (run by the tests)
    python -m benchmarks.gpu_levers --steps overlap,buckets     # chosen steps

Not yet run on a GPU (none was lent when it was written): these are the figures that decide the
defaults of ``overlap``, ``precision bf16-weights``, ``shape_buckets``/``torch_compile`` and the
caption rows fitted to free memory. Steps (each reports rates and what it compared):

* ``overlap``: ``BlipScorer.score`` (batch 256) and ``Blip2Captioner.caption`` (batch 256) from one
  thread against two threads calling at once, as Ray's ``max_concurrent_calls_per_actor=2`` does;
  pairs/s, captions/s, and host CPU seconds per 1,000 rows.
* ``bf16_weights``: the scorer in bf16 autocast against bf16 weights: pairs/s, weight memory, and
  the drift of both from fp32 on the same pairs (mean and max |ITC| and |ITM| differences).
* ``buckets``: ragged batches (sizes as Ray's dedup and error rows leave them) eager, with shape
  buckets, and compiled with buckets: pairs/s after warm-up, the first pass's seconds, and the
  number of graphs dynamo compiled.
* ``caption_rows``: the rows ``rows_for_memory`` picks after BLIP-2 OPT-2.7B loads, and captions/s
  at 256 rows per call against that.

Stages run without Ray (Ray is not on the GPU machine): the operators are called directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STEPS = ("overlap", "bf16_weights", "buckets", "caption_rows")
RAGGED = (256, 256, 241, 256, 199, 256, 87, 256, 230, 256)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, work) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``work()``."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _in_threads(calls: int, function, batches) -> list:
    if calls == 1:
        return [function(*b) for b in batches]
    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(lambda b: function(*b), batches))


def _scorer(args, device: str, precision: str, **options):
    import torch
    from transformers import BlipForImageTextRetrieval

    from benchmarks.gpu_models import itm_config
    from blip_ops.precision import weight_dtype
    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import bench_itm_processor

    config = itm_config(args.smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = BlipForImageTextRetrieval(config).eval().to(weight_dtype(precision))
    processor = bench_itm_processor(config.vision_config.image_size)
    # torch's kernels on the CPU smoke run: the fp32 side is the reference these levers drift from.
    return BlipScorer(model, processor, device, max_text_tokens=35, precision=precision, cpu_kernels="torch", **options)


def _captioner(args, device: str, precision: str = "auto"):
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from benchmarks.gpu_models import blip2_config
    from blip_ops.captioner import Blip2Captioner
    from blip_ops.precision import weight_dtype
    from blip_ops.tiny import _CLIP_MEAN, _CLIP_STD, _opt_tokenizer

    tokenizer = _opt_tokenizer()
    size, queries = (28, 4) if args.smoke else (224, 32)
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)
    config = blip2_config(args.smoke, tokenizer, tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).eval().to(weight_dtype(precision))
    model.generation_config.min_new_tokens = args.tokens  # every caption the same length
    return Blip2Captioner(model, processor, device, max_new_tokens=args.tokens, precision=precision)


_CATALOG: dict = {}


def _pairs(args, resizer, rows: int):
    from benchmarks.gpu_bench import catalog_images, decode_all

    if "blobs" not in _CATALOG:  # one catalog per process: every step reads the same images
        with tempfile.TemporaryDirectory() as tmp:
            _CATALOG["blobs"], _CATALOG["texts"] = catalog_images(Path(tmp), 8 if args.smoke else 512)
    blobs, texts = _CATALOG["blobs"], _CATALOG["texts"]
    (pixels,), _ = decode_all(blobs, [resizer], 16)
    return [(pixels[i % len(pixels)], texts[i % len(texts)]) for i in range(rows)]


def _batches(pairs, sizes):
    out, start = [], 0
    for size in sizes:
        chunk = [pairs[(start + k) % len(pairs)] for k in range(size)]
        out.append(([p[0] for p in chunk], [p[1] for p in chunk]))
        start += size
    return out


def _rate(rows: int, wall: float, cpu: float, what: str) -> dict:
    return {f"{what}_per_s": round(rows / wall, 1), "host_cpu_s_per_1000": round(1000 * cpu / rows, 3)}


def step_overlap(args, device: str) -> dict:
    scorer = _scorer(args, device, "auto")
    batch = 8 if args.smoke else 256
    batches = _batches(_pairs(args, scorer.images, batch), [batch] * (2 if args.smoke else 12))
    _in_threads(1, scorer.score, batches[:2])  # warm-up
    rows = sum(len(t) for _, t in batches)
    result = {"score_batch": batch}
    for calls in (1, 2, 1, 2):
        wall, cpu = _timed(device, lambda: _in_threads(calls, scorer.score, batches))
        result.setdefault(f"score_calls_{calls}", []).append(_rate(rows, wall, cpu, "pairs"))
    del scorer
    captioner = _captioner(args, device)
    images = [[p for p, _ in _pairs(args, captioner.images, batch)]] * (2 if args.smoke else 6)
    _in_threads(1, captioner.caption, [(images[0],)])
    for calls in (1, 2):
        wall, cpu = _timed(device, lambda: _in_threads(calls, captioner.caption, [(i,) for i in images]))
        result[f"caption_calls_{calls}"] = _rate(sum(len(i) for i in images), wall, cpu, "captions")
    return result


def step_bf16_weights(args, device: str) -> dict:
    import numpy as np

    batch = 8 if args.smoke else 256
    result, scores = {}, {}
    for precision in ("fp32", "bf16", "bf16-weights"):
        scorer = _scorer(args, device, precision)
        batches = _batches(_pairs(args, scorer.images, batch * 2), [batch] * 2)
        scores[precision] = [np.concatenate(x) for x in zip(*[scorer.score(*b)[:2] for b in batches])]
        timing = _batches(_pairs(args, scorer.images, batch), [batch] * (2 if args.smoke else 10))
        wall, cpu = _timed(device, lambda: _in_threads(1, scorer.score, timing))
        weights = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
        result[precision] = _rate(sum(len(t) for _, t in timing), wall, cpu, "pairs") | {"weight_bytes": weights}
        del scorer
    for precision in ("bf16", "bf16-weights"):
        for index, name in enumerate(("itc", "itm")):
            delta = np.abs(scores[precision][index] - scores["fp32"][index])
            result[precision][f"{name}_drift_mean"] = float(delta.mean())
            result[precision][f"{name}_drift_max"] = float(delta.max())
    return result


def step_buckets(args, device: str) -> dict:
    import torch

    sizes = [max(1, s // 32) for s in RAGGED] if args.smoke else list(RAGGED)
    result = {"batch_sizes": sizes}
    for name, options in (("eager", {}), ("buckets", {"shape_buckets": True}), ("compiled", {"compile": True})):
        if name == "compiled" and not device.startswith("cuda"):
            result[name] = "skipped: compile applies on CUDA only"
            continue
        torch._dynamo.reset()
        scorer = _scorer(args, device, "auto", **options)
        batches = _batches(_pairs(args, scorer.images, 512), sizes)
        first, _ = _timed(device, lambda: _in_threads(1, scorer.score, batches))
        wall, cpu = _timed(device, lambda: _in_threads(1, scorer.score, batches))
        result[name] = _rate(sum(sizes), wall, cpu, "pairs") | {"first_pass_s": round(first, 2)}
        if name == "compiled":
            from torch._dynamo.utils import counters

            result[name]["graphs"] = int(counters["stats"]["unique_graphs"])
        del scorer
    return result


def step_caption_rows(args, device: str) -> dict:
    from blip_ops.batch_memory import CAPTION_ROWS_MAX
    from blip_ops.oom import HalvingBatches

    captioner = _captioner(args, device)
    chosen = captioner.rows_for_memory(CAPTION_ROWS_MAX)
    batch = 8 if args.smoke else CAPTION_ROWS_MAX
    images = [p for p, _ in _pairs(args, captioner.images, batch)]
    result = {"rows_for_memory": chosen}
    for label, rows in (("fixed_256", 4 if args.smoke else 256), ("from_memory", chosen or batch)):
        parts = HalvingBatches("captioning")
        parts.rows_per_call = rows
        run = lambda: parts.run(lambda a, b: captioner.caption(images[a:b]), len(images))  # noqa: E731
        run()  # warm-up
        wall, cpu = _timed(device, lambda: [run() for _ in range(1 if args.smoke else 3)])
        result[label] = _rate(len(images) * (1 if args.smoke else 3), wall, cpu, "captions") | {"rows_per_call": rows}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--tokens", type=int, default=20, help="tokens per caption (the issue's goal: 20)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    import torch

    result = {"smoke": args.smoke, "device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}
    steps = {"overlap": step_overlap, "bf16_weights": step_bf16_weights, "buckets": step_buckets,
             "caption_rows": step_caption_rows}
    for name in args.steps.split(","):
        started = time.perf_counter()
        try:
            result[name] = steps[name](args, device) | {"seconds": round(time.perf_counter() - started, 1)}
        except Exception as exc:  # one failed step must not lose the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if all("error" not in v for v in result.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
