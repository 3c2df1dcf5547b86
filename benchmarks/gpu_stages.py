"""The model stages as the job runs them, without Ray: Parquet bytes -> ``decode_batch`` -> ``ScoreStage``
-> ``flag_batch`` -> ``CaptionStage``, with ``--decode-device cpu`` and ``gpu``.

Run by ``benchmarks.gpu_bench --stages`` (its naive loops beside, in the same run). Ray is not on the
GPU machine and too large to carry, so the stages are called directly: each ``decode_batch`` runs
as a Ray decode task would (one process per task, here a process pool), each model stage is built
once as an actor builds it and called on batches of its batch size. Only the model loading is
replaced: ``from_pretrained`` returns the random-weight full-size models built in memory (saving
BLIP-2 OPT-2.7B's 15 GB to disk to load it again would measure the disk); the resize the decode
tasks read comes from the processors saved to a directory, as from a checkpoint.

Reported per decode device: pairs/s of the score stage and captions/s of the caption stage
(each on its own, after warm-up batches; in ``gpu`` mode the stage time includes its JPEG decode
and resize), GPU utilisation, achieved TFLOP/s, the stage process's host CPU seconds per 1,000
rows (every thread of the process, from ``time.process_time``), the decode tasks' CPU seconds per
1,000 rows (one process, serially), and from those the CPU cores per GPU that decoding needs at
the stage's rate. Separately: the device JPEG decode + resize alone, images/s, for 480x360 JPEGs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITM_DIR, CAPTION_DIR = "itm", "caption"


def write_photo_catalog(directory: Path, rows: int, distinct: int) -> Path:
    """``rows`` records: ``distinct`` photo-like 480x360 JPEGs (cycled) with numbered titles."""
    from benchmarks.samples import photo

    blobs = [photo(480, 360, seed) for seed in range(min(rows, distinct))]
    table = pa.table({
        "id": [f"item-{i:06d}" for i in range(rows)],
        "text": [f"a photo of coloured discs on a gradient, listing {i}" for i in range(rows)],
        "image": pa.array([blobs[i % len(blobs)] for i in range(rows)], pa.binary()),
    })
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "catalog.parquet", row_group_size=64)
    return directory / "catalog.parquet"


def _decode_kwargs(workdir: Path, decode_device: str, captions: bool) -> dict:
    return {
        "text_column": "text", "image_column": "image", "from_uri": False,
        "score_model": str(workdir / ITM_DIR), "caption_model": str(workdir / CAPTION_DIR) if captions else None,
        "decode_device": decode_device,
    }


def _decode_one(args) -> pa.Table:
    from pipelines.dataflow.stages import decode_batch

    table, kwargs = args
    return decode_batch(table, **kwargs)


def decode_catalog(path: Path, kwargs: dict, processes: int) -> tuple[list[pa.Table], float]:
    """Every 64-row read batch decoded as a decode task would; returns the tables and the decode CPU
    seconds per 1,000 rows, measured serially in this process on the first batches."""
    from pipelines.dataflow.stages import decode_batch

    batches = [pa.Table.from_batches([b]) for b in pq.ParquetFile(path).iter_batches(batch_size=64)]
    sample = batches[: max(1, min(len(batches), 4))]
    decode_batch(sample[0], **kwargs)  # warm: the resize settings are read once per process
    cpu = time.process_time()
    for batch in sample:
        decode_batch(batch, **kwargs)
    cpu_per_1000 = (time.process_time() - cpu) * 1000 / sum(b.num_rows for b in sample)
    if processes > 1:
        import multiprocessing

        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            decoded = list(pool.map(_decode_one, [(b, kwargs) for b in batches]))
    else:
        decoded = [decode_batch(b, **kwargs) for b in batches]
    return decoded, cpu_per_1000


def rebatch(tables: list[pa.Table], total: int, batch_size: int) -> list[pa.Table]:
    """``total`` rows in batches of ``batch_size``, cycling through the decoded rows (as Ray hands an actor its batches)."""
    rows = pa.concat_tables(tables)
    out, index = [], 0
    while index < total:
        size = min(batch_size, total - index)
        start = index % rows.num_rows
        piece = rows.slice(start, size)
        if piece.num_rows < size:  # wrap around
            piece = pa.concat_tables([piece, rows.slice(0, size - piece.num_rows)])
        out.append(piece.combine_chunks())
        index += size
    return out


@contextlib.contextmanager
def _models_from_memory(scorer=None, captioner=None):
    """The stages' ``from_pretrained`` calls return the models built in memory."""
    from blip_ops.captioner import Blip2Captioner
    from blip_ops.scorer import BlipScorer

    saved = BlipScorer.from_pretrained, Blip2Captioner.from_pretrained
    BlipScorer.from_pretrained = classmethod(lambda cls, *a, **k: scorer)
    Blip2Captioner.from_pretrained = classmethod(lambda cls, *a, **k: captioner)
    try:
        yield
    finally:
        BlipScorer.from_pretrained, Blip2Captioner.from_pretrained = saved


def _timed_stage(stage, batches: list[pa.Table], warmup: int, device: str, **kwargs) -> tuple[dict, list[pa.Table]]:
    from benchmarks.gpu_models import GpuUtilisation, _sync

    for batch in batches[:warmup]:
        stage(batch, **kwargs)
    measured = batches[warmup:] or batches
    _sync(device)
    cpu, started = time.process_time(), time.perf_counter()
    with GpuUtilisation(device) as gpu:
        outputs = [stage(batch, **kwargs) for batch in measured]
        _sync(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    rows = sum(b.num_rows for b in measured)
    return {"rows": rows, "seconds": seconds, "host_cpu_s_per_1000_rows": round(cpu_seconds * 1000 / rows, 3),
            "gpu_util_percent": gpu.mean}, outputs


def bench_stages(args, device: str, workdir: Path, itm, blip2) -> dict:
    """``itm``: (model, processor, gflop per pair); ``blip2``: (model, processor, gflop per caption) or None."""
    from blip_ops.captioner import Blip2Captioner
    from blip_ops.jpeg_device import torchvision_problem
    from blip_ops.scorer import BlipScorer
    from pipelines.dataflow.stages import CaptionStage, ScoreStage, flag_batch

    itm_model, itm_processor, pair_gflop = itm
    itm_processor.save_pretrained(workdir / ITM_DIR)
    if blip2 is not None:
        blip2[1].save_pretrained(workdir / CAPTION_DIR)
    backend = args.jpeg_backend
    if backend == "auto":
        backend = "pil" if torchvision_problem() else "torchvision"
    catalog = write_photo_catalog(workdir / "catalog", args.rows, args.distinct_images)
    scorer = BlipScorer(itm_model, itm_processor, device, max_text_tokens=35, precision=args.precision)
    captioner = None
    if blip2 is not None:
        captioner = Blip2Captioner(blip2[0], blip2[1], device, max_new_tokens=args.tokens, precision=args.precision, cache=args.cache)
    result = {"jpeg_backend": backend, "rows_in_catalog": args.rows, "distinct_images": min(args.rows, args.distinct_images),
              "score_batch_size": args.score_batch_size, "caption_batch_size": args.caption_batch_size,
              "decode_processes": args.decode_processes}
    for mode in args.decode_devices:
        kwargs = _decode_kwargs(workdir, mode, blip2 is not None)
        decoded, decode_cpu = decode_catalog(catalog, kwargs, args.decode_processes)
        with _models_from_memory(scorer, captioner):
            score_stage = ScoreStage(model=str(workdir / ITM_DIR), device=device, max_text_tokens=35, text_column="text",
                                     precision=args.precision, evidence="none", decode_device=mode, jpeg_backend=backend)
            caption_stage = None
            if captioner is not None:
                caption_stage = CaptionStage(model=str(workdir / CAPTION_DIR), device=device, max_new_tokens=args.tokens,
                                             prompt=None, policy="all", precision=args.precision, text_column="text",
                                             decode_device=mode, jpeg_backend=backend)
        score_run, scored = _timed_stage(
            score_stage, rebatch(decoded, args.stage_pairs, args.score_batch_size), args.warmup, device,
            itm_threshold=0.5, itc_threshold=0.2,
        )
        pairs_per_s = score_run["rows"] / score_run["seconds"]
        scored_rows = sum(int(t.column("itc_score").is_valid().to_numpy(zero_copy_only=False).sum()) for t in scored)
        section = {
            "pairs_per_s": round(pairs_per_s, 2),
            "pairs_scored": scored_rows, "pairs_measured": score_run["rows"],
            "gpu_util_percent": score_run["gpu_util_percent"],
            "achieved_tflops": round(pairs_per_s * pair_gflop / 1e3, 2),
            "fraction_of_peak": round(pairs_per_s * pair_gflop / 1e3 / args.peak_tflops, 3),
            "score_actor_host_cpu_s_per_1000_rows": score_run["host_cpu_s_per_1000_rows"],
            "decode_task_cpu_s_per_1000_rows": round(decode_cpu, 3),
            # What a GPU running the score stage at this rate needs from the CPUs around it.
            "decode_cores_per_gpu_at_this_rate": round(decode_cpu / 1000 * pairs_per_s, 2),
            "host_cores_per_gpu_at_this_rate": round((decode_cpu + score_run["host_cpu_s_per_1000_rows"]) / 1000 * pairs_per_s, 2),
            "score_actor_jpeg_rows": dict(score_stage.jpegs.counts) if score_stage.jpegs else None,
        }
        if caption_stage is not None:
            flagged = [flag_batch(t, itm_threshold=0.5, itc_threshold=0.2) for t in scored]
            caption_batches = rebatch(flagged, args.stage_captions, args.caption_batch_size)
            caption_run, captioned = _timed_stage(caption_stage, caption_batches, args.warmup, device)
            captions_per_s = caption_run["rows"] / caption_run["seconds"]
            section |= {
                "captions_per_s": round(captions_per_s, 2),
                "captions_made": sum(t.column("caption").is_valid().to_numpy(zero_copy_only=False).sum().item() for t in captioned),
                "caption_gpu_util_percent": caption_run["gpu_util_percent"],
                "caption_achieved_tflops": round(captions_per_s * blip2[2] / 1e3, 2),
                "caption_actor_host_cpu_s_per_1000_rows": caption_run["host_cpu_s_per_1000_rows"],
                "caption_actor_jpeg_rows": dict(caption_stage.jpegs.counts) if caption_stage.jpegs else None,
            }
        result[f"decode_{mode}"] = section
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    result["device_jpeg_decode"] = bench_device_decode(args, device, backend)
    return result


def build_itm(args, device: str):
    """Random-weight BLIP-base (or tiny, ``--smoke``) ITM model, its processor and GFLOP per pair."""
    import torch
    from transformers import BlipForImageTextRetrieval

    from benchmarks.gpu_models import itm_config, itm_pair_gflop
    from blip_ops.tiny import bench_itm_processor

    config = itm_config(args.smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = BlipForImageTextRetrieval(config).eval()
    processor = bench_itm_processor(config.vision_config.image_size)
    lengths = processor.tokenizer(["a photo of coloured discs on a gradient, listing 100"], truncation=True, max_length=35)["input_ids"]
    return model, processor, itm_pair_gflop(config, len(lengths[0]))


def build_blip2(args, device: str):
    """Random-weight BLIP-2 OPT-2.7B (or tiny), its processor and GFLOP per caption of ``--tokens`` tokens."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from benchmarks.gpu_models import blip2_config, blip2_gflop
    from blip_ops.tiny import _CLIP_MEAN, _CLIP_STD, _opt_tokenizer

    tokenizer = _opt_tokenizer()
    size = 28 if args.smoke else 224
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4 if args.smoke else 32)
    config = blip2_config(args.smoke, tokenizer, tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.min_new_tokens = args.tokens  # every caption exactly --tokens long
    image_gflop, token_gflop = blip2_gflop(model, prompt_tokens=0)
    return model, processor, image_gflop + (args.tokens - 1) * token_gflop


def bench_device_decode(args, device: str, backend: str) -> dict:
    """``DeviceJpegDecoder`` alone on 480x360 photo JPEGs to 384x384: images/s (decode, EXIF turn, resize)."""
    from benchmarks.gpu_models import _sync
    from benchmarks.samples import photo
    from blip_ops.jpeg_device import DeviceJpegDecoder
    from blip_ops.preprocess import Resize

    side = 64 if args.smoke else 384
    blobs = [photo(480, 360, seed) for seed in range(min(args.decode_batch, 64))]
    batch = [blobs[i % len(blobs)] for i in range(args.decode_batch)]
    decoder = DeviceJpegDecoder(Resize(side, side, 3), device, backend)
    for _ in range(args.warmup):
        decoder.decode(batch, [1] * len(batch))
    rates, cpu = [], time.process_time()
    for _ in range(args.decode_repeats):
        _sync(device)
        started = time.perf_counter()
        out = decoder.decode(batch, [1] * len(batch))
        _sync(device)
        rates.append(len(batch) / (time.perf_counter() - started))
    cpu_seconds = time.process_time() - cpu
    return {
        "images_per_s": round(statistics.median(rates), 1),
        "image_size": "480x360", "output_side": side, "batch": len(batch), "backend": backend, "device": device,
        "host_cpu_s_per_1000_images": round(cpu_seconds * 1000 / (len(batch) * args.decode_repeats), 3),
        "on_device": out.on_device, "fell_back": out.fell_back,
        "mean_abs_levels_vs_pillow": _mean_difference(blobs[:8], decoder),
    }


def _mean_difference(blobs: list[bytes], decoder) -> float:
    from blip_ops.images import decode_rgb

    reference = np.stack([decoder.resize.resize(decode_rgb(b)) for b in blobs]).astype(np.int16)
    pixels = decoder.decode(blobs, [1] * len(blobs)).pixels.cpu().numpy().astype(np.int16)
    return round(float(np.abs(pixels - reference).mean()), 4)
