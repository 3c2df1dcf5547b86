"""GPU benchmark: full-size BLIP-base ITM and BLIP-2 OPT-2.7B (random weights, real shapes).

    python -m benchmarks.gpu_bench                     # on a machine with a CUDA GPU
    python -m benchmarks.gpu_bench --smoke --json      # tiny shapes on the CPU (run by the tests)
    bash benchmarks/device/run_gpu_bench.sh            # on the lent GPU machine (see that script)

Random weights have the real shapes, so every matrix multiply costs what the real model's
does; scores and captions mean nothing. To make every caption cost the same, each one is
forced to exactly ``--tokens`` new tokens (``min_new_tokens``), on both sides.

What is measured, after warm-up batches, with the GPU synchronised at each clock read:

* **decode**: image bytes read from a Parquet file, decoded and resized to uint8 at model
  resolution by a thread pool (in the pipeline this runs in Ray CPU tasks on other cores).
* **score**, this project: ``BlipScorer.score`` on decoded uint8 batches: normalisation on the
  GPU, one vision pass for ITC and ITM, ``--precision`` (auto: bf16 autocast, vision attention fused).
* **score**, naive: what a user writes by hand on the same decoded images: the processor on
  PIL images, then ``BlipForImageTextRetrieval`` twice (ITM, then ITC), fp32 as loaded.
* **caption**, this project: ``Blip2Captioner.caption`` (batched greedy, KV cache, autocast);
  naive: processor on PIL images and ``generate`` in fp32, same batch size.

Reported: pairs/s and captions/s for each side and their ratio, mean GPU utilisation while
each side ran (``nvidia-smi``), and achieved TFLOP/s counted from the model shapes (one vision
pass per pair for both sides, so the naive side's wasted second pass is not credited). The
arithmetic ceiling is ``--peak-tflops`` (default 989: H100 SXM dense bf16) over those FLOPs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from benchmarks.gpu_models import (  # shared with gpu_stages and gpu_levers, so none imports another in a circle
    GpuUtilisation,
    _sync,
    blip2_config,
    blip2_gflop,
    itm_config,
    itm_pair_gflop,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The issue's estimates, printed beside the counts from the shapes for comparison.
ISSUE_ITM_GFLOP_PER_PAIR = 141.0
ISSUE_BLIP2_TFLOP_PER_IMAGE = 0.7
ISSUE_BLIP2_GFLOP_PER_TOKEN = 5.3


# --- data ---------------------------------------------------------------------------------


def catalog_images(directory: Path, rows: int) -> tuple[list[bytes], list[str]]:
    """Write a Parquet catalog (JPEG bytes, titles) and read the image bytes back from it."""
    import pyarrow.parquet as pq

    from benchmarks.cpu_bench import write_catalog

    write_catalog(directory, rows, rows_per_group=64)
    table = pq.read_table(directory / "catalog.parquet", columns=["image", "text"])
    return table.column("image").to_pylist(), table.column("text").to_pylist()


def decode_all(blobs: list[bytes], preparers, workers: int) -> tuple[list[list], float]:
    """uint8 arrays at each preparer's resolution; returns them and images/s."""
    from blip_ops.images import decode_rgb

    def one(blob):
        rgb = decode_rgb(blob)
        return [p.resize(rgb) for p in preparers]

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(one, blobs))
    elapsed = time.perf_counter() - started
    return [list(column) for column in zip(*decoded)], len(blobs) / elapsed


_RESIZERS: list = []


def _decode_in_worker(blob: bytes) -> int:
    from blip_ops.images import decode_rgb

    rgb = decode_rgb(blob)
    # Only the size comes back: pickling the arrays to this process would time the pipe, not
    # decoding (the pipeline's tasks hand theirs to Ray's shared-memory object store).
    return sum(resizer.resize(rgb).nbytes for resizer in _RESIZERS)


def _set_resizers(resizers) -> None:
    _RESIZERS[:] = resizers


def decode_rate_in_processes(blobs: list[bytes], resizers, processes: int, repeat: int = 4) -> float:
    """Images/s decoded and resized by ``processes`` worker processes, as the pipeline's decode
    tasks run (each its own process, so the GIL does not limit them); ``repeat`` passes over
    the blobs so start-up does not dominate. Only the rate is kept."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_set_resizers, initargs=(resizers,)) as pool:
        list(pool.map(_decode_in_worker, blobs[:processes], chunksize=1))  # workers started and warm
        started = time.perf_counter()
        for _ in range(repeat):
            for _result in pool.map(_decode_in_worker, blobs, chunksize=8):
                pass
        return len(blobs) * repeat / (time.perf_counter() - started)


def pil_images(blobs: list[bytes]) -> list:
    from PIL import Image, ImageOps

    return [ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB") for b in blobs]


def cycle_batches(items: list, total: int, batch_size: int):
    """``total`` items in batches, cycling through ``items``."""
    index = 0
    while index < total:
        size = min(batch_size, total - index)
        yield [items[(index + k) % len(items)] for k in range(size)], index
        index += size


# --- measuring ----------------------------------------------------------------------------


@contextmanager
def timed(device: str, result: dict):
    _sync(device)
    started = time.perf_counter()
    with GpuUtilisation(device) as gpu:
        yield
        _sync(device)
    result["seconds"] = time.perf_counter() - started
    result["gpu_util_percent"] = gpu.mean


def run_timed(step, batches, warmup: int, device: str) -> dict:
    """``step(batch)`` over ``batches`` after ``warmup`` untimed batches; returns seconds, items and outputs."""
    batches = list(batches)
    _sync(device)
    started = time.perf_counter()
    for batch, _ in batches[:warmup]:
        step(batch)
    _sync(device)
    warmup_seconds = time.perf_counter() - started  # includes torch.compile where it happens
    measured = batches[warmup:] or batches
    result: dict = {"items": sum(len(b) for b, _ in measured), "outputs": [], "warmup_seconds": round(warmup_seconds, 2)}
    with timed(device, result):
        for batch, start in measured:
            result["outputs"].append((start, step(batch)))
    return result


# --- the two workloads --------------------------------------------------------------------


def bench_scoring(args, device: str, blobs, texts) -> dict:
    import numpy as np
    import torch
    from transformers import BlipForImageTextRetrieval

    from blip_ops.preprocess import ImagePreparer
    from blip_ops.scorer import BlipScorer
    from blip_ops.tiny import bench_itm_processor

    config = itm_config(args.smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = BlipForImageTextRetrieval(config).eval()
    processor = bench_itm_processor(config.vision_config.image_size)
    scorer = BlipScorer(model, processor, device, max_text_tokens=35, precision=args.precision)
    if args.eager_attention:
        scorer.fused_attention = False  # to measure what the fused vision attention buys
    scorer.images.pin_memory = not args.pageable
    if args.compile:
        scorer._forward = torch.compile(scorer._forward)  # a trial, not a project option
    preparer = ImagePreparer(processor.image_processor)
    (resized,), decode_rate = decode_all(blobs, [preparer], args.decode_threads)
    process_rate = (
        decode_rate_in_processes(blobs, [preparer.resizer], args.decode_processes) if args.decode_processes else None
    )
    pairs = list(zip(resized, texts))
    pinned_equal = _pinned_pixels_equal(scorer.images, resized[: args.score_batch_size], device)

    def ours(batch):
        itc, itm, _ = scorer.score([p[0] for p in batch], [p[1] for p in batch])
        return itc, itm

    fast = run_timed(ours, cycle_batches(pairs, args.pairs, args.score_batch_size), args.warmup, device)
    sweep = {
        size: _rate("pairs", run_timed(ours, cycle_batches(pairs, args.pairs, size), args.warmup, device))
        for size in args.sweep_score_batch_sizes
    }
    extra = {"batch_size_sweep": sweep} if sweep else {}
    token_lengths = processor.tokenizer(texts[:256], padding=False, truncation=True, max_length=35)["input_ids"]
    gflop = itm_pair_gflop(config, statistics.fmean(len(ids) for ids in token_lengths))
    extra |= {
        "decode_resize_images_per_s": round(decode_rate, 1),
        "decode_threads": args.decode_threads,
        "decode_processes": args.decode_processes,
        "decode_resize_images_per_s_processes": round(process_rate, 1) if process_rate else None,
        "gflop_per_pair_from_shapes": round(gflop, 1),
        "gflop_per_pair_issue_estimate": ISSUE_ITM_GFLOP_PER_PAIR,
        "precision": scorer.precision,
        "fused_vision_attention": scorer.fused_attention,
        "pinned_staging": scorer.images.pin_memory,
        "pinned_pixels_equal_pageable": pinned_equal,
        "compiled": args.compile,
        "batch_size": args.score_batch_size,
    }
    if args.skip_naive:
        return _report("pairs", fast, None, gflop, args.peak_tflops) | extra

    images = pil_images(blobs)
    naive_pairs = list(zip(images, texts))

    @torch.no_grad()
    def naive(batch):
        inputs = processor(
            images=[p[0] for p in batch], text=[p[1] for p in batch], padding=True, truncation=True, max_length=35, return_tensors="pt"
        ).to(device)
        itm = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[:, 1]
        itc = model(**inputs, use_itm_head=False).itm_score.diagonal()
        return itc.float().cpu().numpy(), itm.float().cpu().numpy()

    slow = run_timed(naive, cycle_batches(naive_pairs, args.naive_pairs, args.score_batch_size), args.warmup, device)

    # Both sides scored the first rows of the cycle: compare them.
    first = {start: out for start, out in fast["outputs"]}
    differences = [
        float(np.max(np.abs(np.concatenate(out) - np.concatenate(first[start]))))
        for start, out in slow["outputs"]
        if start in first and len(first[start][0]) == len(out[0])
    ]
    return _report("pairs", fast, slow, gflop, args.peak_tflops) | extra | {
        "max_score_difference_vs_naive": max(differences) if differences else None,
    }


def _pinned_pixels_equal(images, batch, device: str) -> bool | None:
    """The pinned staging path gives the same pixel values as the plain copy (None off CUDA)."""
    import torch

    if not device.startswith("cuda"):
        return None
    saved = images.pin_memory
    try:
        images.pin_memory = True
        pinned = images.to_device_pixel_values(batch, device)
        images.pin_memory = False
        return bool(torch.equal(pinned, images.to_device_pixel_values(batch, device)))
    finally:
        images.pin_memory = saved


def bench_captioning(args, device: str, blobs) -> dict:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip_ops.captioner import Blip2Captioner
    from blip_ops.preprocess import ImagePreparer
    from blip_ops.tiny import _CLIP_MEAN, _CLIP_STD, _opt_tokenizer

    tokenizer = _opt_tokenizer()  # ids past its vocabulary decode to nothing: captions are not read
    size = 28 if args.smoke else 224
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    queries = 4 if args.smoke else 32
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)
    config = blip2_config(args.smoke, tokenizer, tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).eval()
    # Every caption exactly --tokens long, on both sides, so captions/s compare like with like.
    model.generation_config.min_new_tokens = args.tokens
    captioner = Blip2Captioner(model, processor, device, max_new_tokens=args.tokens, precision=args.precision, cache=args.cache)
    (resized,), _ = decode_all(blobs, [ImagePreparer(image_processor)], args.decode_threads)

    fast = run_timed(captioner.caption, cycle_batches(resized, args.captions, args.caption_batch_size), args.warmup, device)
    sweep = {
        size: _rate("captions", run_timed(captioner.caption, cycle_batches(resized, args.captions, size), args.warmup, device))
        for size in args.sweep_caption_batch_sizes
    }
    image_gflop, token_gflop = blip2_gflop(model, prompt_tokens=0)
    gflop = image_gflop + (args.tokens - 1) * token_gflop
    extra = {"batch_size_sweep": sweep} if sweep else {}
    extra |= {
        "tokens_per_caption": args.tokens,
        "gflop_per_image_from_shapes": round(image_gflop, 1),
        "gflop_per_token_from_shapes": round(token_gflop, 2),
        "issue_estimate": {"tflop_per_image": ISSUE_BLIP2_TFLOP_PER_IMAGE, "gflop_per_token": ISSUE_BLIP2_GFLOP_PER_TOKEN},
        "precision": captioner.precision,
        "cache": args.cache,
        "batch_size": args.caption_batch_size,
    }
    if args.skip_naive:
        return _report("captions", fast, None, gflop, args.peak_tflops) | extra

    images = pil_images(blobs)

    @torch.no_grad()
    def naive(batch):
        inputs = processor(images=batch, return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False)
        return [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]

    slow = run_timed(naive, cycle_batches(images, args.naive_captions, args.caption_batch_size), args.warmup, device)
    first = {start: out for start, out in fast["outputs"]}
    compared = [(a, b) for start, out in slow["outputs"] if start in first for a, b in zip(out, first[start])]
    return _report("captions", fast, slow, gflop, args.peak_tflops) | extra | {
        "captions_equal_to_naive": round(sum(a == b for a, b in compared) / len(compared), 3) if compared else None,
    }


def bench_decoding(args, blobs) -> dict:
    """Decode and resize to BLIP ITM's 384 px only, in threads and in processes: no model."""
    from blip_ops.preprocess import Resize
    from blip_ops.tiny import bench_itm_processor

    side = 64 if args.smoke else 384
    resizer = Resize.from_processor(bench_itm_processor(side).image_processor)
    _, thread_rate = decode_all(blobs, [resizer], args.decode_threads)
    processes = sorted({1, args.decode_processes or os.cpu_count() or 1})
    return {
        "side": side,
        "threads": args.decode_threads,
        "images_per_s_threads": round(thread_rate, 1),
        "images_per_s_processes": {n: round(decode_rate_in_processes(blobs, [resizer], n), 1) for n in processes},
    }


def _rate(unit: str, run: dict) -> dict:
    return {
        f"{unit}_per_s": round(run["items"] / run["seconds"], 2),
        "gpu_util_percent": run["gpu_util_percent"],
        "warmup_seconds": run["warmup_seconds"],
    }


def _report(unit: str, fast: dict, slow: dict | None, gflop_per_item: float, peak_tflops: float) -> dict:
    """``slow`` is None with --skip-naive: this project's side only."""
    fast_rate = fast["items"] / fast["seconds"]
    report = {
        f"{unit}_per_s": round(fast_rate, 2),
        "measured_items": fast["items"],
        "warmup_seconds": fast["warmup_seconds"],
        "achieved_tflops": round(fast_rate * gflop_per_item / 1e3, 2),
        "fraction_of_peak": round(fast_rate * gflop_per_item / 1e3 / peak_tflops, 3),
        f"ceiling_{unit}_per_s": round(peak_tflops * 1e3 / gflop_per_item, 1),
        "gpu_util_percent": fast["gpu_util_percent"],
    }
    if slow is None:
        return report
    slow_rate = slow["items"] / slow["seconds"]
    return report | {
        f"naive_{unit}_per_s": round(slow_rate, 2),
        "ratio": round(fast_rate / slow_rate, 2),
        "naive_measured_items": slow["items"],
        "naive_achieved_tflops": round(slow_rate * gflop_per_item / 1e3, 2),
        "naive_gpu_util_percent": slow["gpu_util_percent"],
    }


def _bench_stages(args, device: str, workdir: Path) -> dict:
    """The stage classes with each decode device (benchmarks.gpu_stages), on fresh models."""
    import torch

    from benchmarks import gpu_stages

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    itm = gpu_stages.build_itm(args, device)
    blip2 = None if args.skip_captions or args.skip_scoring else gpu_stages.build_blip2(args, device)
    return gpu_stages.bench_stages(args, device, workdir, itm, blip2)


def _environment(device: str) -> dict:
    import torch

    env = {"device": device, "torch": torch.__version__, "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few rows; runs on the CPU")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 for this project's side")
    parser.add_argument("--rows", type=int, default=512, help="rows in the Parquet catalog (images cycle through them)")
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument("--naive-pairs", type=int, default=2048)
    parser.add_argument("--captions", type=int, default=2048)
    parser.add_argument("--naive-captions", type=int, default=512)
    parser.add_argument("--score-batch-size", type=int, default=256)
    parser.add_argument("--caption-batch-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=20, help="generated tokens per caption")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before each measurement")
    parser.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--decode-processes", type=int, default=0, help="also time decoding in this many processes, as the pipeline's decode tasks run (0: skip)"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--skip-captions", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true", help="captioning only")
    parser.add_argument("--decode-only", action="store_true", help="only decode+resize rates (threads, processes); no model")
    parser.add_argument("--skip-naive", action="store_true", help="this project's side only (no baseline, no ratio)")
    parser.add_argument("--cache", default="dynamic", choices=("dynamic", "static"), help="captioner KV cache; static compiles on a GPU")
    parser.add_argument("--eager-attention", action="store_true", help="scorer: transformers' eager vision attention even in half precision")
    parser.add_argument("--pageable", action="store_true", help="scorer: copy pixels to the GPU without pinned staging")
    parser.add_argument("--compile", action="store_true", help="scorer: torch.compile its forward (a trial)")
    parser.add_argument("--sweep-score-batch-sizes", type=_sizes, default=[], help="comma-separated: also time this side at these sizes")
    parser.add_argument("--sweep-caption-batch-sizes", type=_sizes, default=[], help="comma-separated, as above")
    parser.add_argument("--stages", action="store_true", help="also the stage classes as the job runs them (benchmarks.gpu_stages)")
    parser.add_argument("--stages-only", action="store_true", help="only --stages (no naive loops, no model-only figures)")
    parser.add_argument("--decode-devices", type=lambda t: [p.strip() for p in t.split(",") if p.strip()], default=["cpu", "gpu"],
                        help="with --stages: comma-separated decode devices to run the stages with")
    parser.add_argument("--jpeg-backend", default="auto", choices=("auto", "torchvision", "pil"),
                        help="device JPEG decoder for --stages (auto: torchvision where it imports, else the Pillow stand-in)")
    parser.add_argument("--stage-pairs", type=int, default=8192, help="with --stages: pairs through the score stage per decode device")
    parser.add_argument("--stage-captions", type=int, default=1024, help="with --stages: rows through the caption stage per decode device")
    parser.add_argument("--distinct-images", type=int, default=256, help="with --stages: distinct photo-like JPEGs in the catalog")
    parser.add_argument("--decode-batch", type=int, default=256, help="with --stages: images per device JPEG decode call")
    parser.add_argument("--decode-repeats", type=int, default=10, help="with --stages: timed device JPEG decode calls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.pairs, args.naive_pairs, args.captions, args.naive_captions = 16, 24, 16, 8, 8
        args.score_batch_size, args.caption_batch_size, args.tokens, args.warmup = 8, 4, 4, 1
        args.sweep_score_batch_sizes = [min(size, 16) for size in args.sweep_score_batch_sizes]
        args.sweep_caption_batch_sizes = [min(size, 8) for size in args.sweep_caption_batch_sizes]
        args.decode_threads = min(args.decode_threads, 2)
        args.decode_processes = min(args.decode_processes, 2)
        args.stage_pairs, args.stage_captions, args.distinct_images, args.decode_batch, args.decode_repeats = 24, 8, 8, 8, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from blip_ops.checkpoints import resolve_device

    device = resolve_device(args.device)
    if device == "cpu" and not args.smoke:
        print("warning: no CUDA device; full-size models on the CPU will take a very long time", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="blip-gpu-bench-"))
    try:
        blobs, texts = catalog_images(workdir, args.rows)
        result = {"environment": _environment(device), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        if args.decode_only:
            result["decoding"] = bench_decoding(args, blobs)
        elif args.stages_only:
            args.stages = True
        elif not args.skip_scoring:
            result["scoring"] = bench_scoring(args, device, blobs, texts)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if not args.skip_captions and not args.decode_only and not args.stages_only:
            result["captioning"] = bench_captioning(args, device, blobs)
        if args.stages:
            result["stages"] = _bench_stages(args, device, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["smoke"] = args.smoke
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
