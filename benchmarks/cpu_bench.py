"""CPU benchmark: the naive Hugging Face loop against this pipeline, same catalog, same checkpoint.

    python -m benchmarks.cpu_bench                 # about 11 minutes on 2 quiet cores
    python -m benchmarks.cpu_bench --rows 64       # a quick look

Both sides score the same generated catalog (JPEG product-style images at 480x360, short
titles) with the same random-weight checkpoint in BLIP-base's layout (ViT-B/16 at 384 px
and BERT, 64-wide heads, 4x MLPs) at reduced width and depth, in fp32:

* **naive**: what a user writes by hand. Read the Parquet batch by batch, decode with PIL,
  run the checkpoint's processor on the PIL images, then call ``BlipForImageTextRetrieval``
  twice, ``use_itm_head=True`` for ITM and ``use_itm_head=False`` for ITC, so the vision
  encoder runs twice per batch. All in this process, with torch's default threads.
* **pipeline**: ``pipelines.run.run_job`` on a local Ray: decode tasks resize to uint8 on
  CPU workers while the scoring actor runs one vision pass per batch for ITC and ITM.

Times include reading, decoding and model loading on both sides; the Ray instance is
started before the clock (on a cluster it is already running). The script also checks that
both sides computed the same scores, so the speed-up is not bought with different numbers.

``--defaults`` is the headline, what a new user gets: each side in a fresh process, timed
from the command to its exit (imports, Ray start, model loads included). The pipeline is
``python -m jobs.score`` at exactly its CLI defaults (``--caption-model none --device cpu``
and the model, nothing else), which starts its own local Ray; the checkpoint is the
mid-size one (width 384, 6 layers, 384 px)::

    python -m benchmarks.cpu_bench --defaults --rows 1000

**datajuicer**, the third side, when Data-Juicer's own venv exists
(``bash benchmarks/datajuicer/setup.sh`` makes ``.venv-datajuicer``; ``--datajuicer PYTHON``
names another, ``--datajuicer none`` skips it): its ``dj-process`` CLI, a fresh process timed
to its exit like the others, running ``image_text_matching_filter`` at its defaults (one image
per forward, ITM only, ``num_proc`` chosen by Data-Juicer: one process per core here, one torch
thread each) on the same rows, read from a Parquet copy of the catalog in Data-Juicer's layout
(``images`` keys, ``image_bytes``, text wrapped in its image and end-of-chunk tokens), and the
same checkpoint: Data-Juicer loads ``hf_blip`` through ``transformers.AutoProcessor`` and the
class in the checkpoint's ``config.architectures`` (``BlipForImageTextRetrieval``), so a local
directory works as is. Only ``min_score`` is lowered to 0, so that every row, and its score,
comes back; it changes no computation. Its ITM scores are checked against the pipeline's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine() -> dict:
    """What the figures were measured on (shared machines: the load average matters)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def write_catalog(directory: Path, rows: int, rows_per_group: int, seed: int = 0, distinct: bool = False) -> Path:
    """``rows`` records: a drawn shape as a 480x360 JPEG and a short title (a quarter mismatched).
    The 12 images and 4 title colours make at most 48 distinct pairs, which dedup scores once each;
    ``distinct`` numbers every title, so every pair is new and the model sees every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blip_ops.samples import COLORS, SHAPES, draw_shape

    rng = random.Random(seed)
    images = {(c, s): draw_shape(c, s, size=(480, 360)) for c in COLORS for s in SHAPES}
    ids, texts, blobs = [], [], []
    for index in range(rows):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        text_color = color if index % 4 else rng.choice([c for c in COLORS if c != color])
        ids.append(f"item-{index:06d}")
        texts.append(f"a {text_color} {shape} on a white background" + (f", listing {index}" if distinct else ""))
        blobs.append(images[(color, shape)])
    table = pa.table({"id": ids, "text": texts, "image": pa.array(blobs, pa.binary())})
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "catalog.parquet", row_group_size=rows_per_group)
    return directory


def naive_baseline(checkpoint: str, catalog: Path, batch_size: int, max_text_tokens: int = 35) -> tuple[dict, float]:
    """The hand-written loop: two model calls per batch, processor on PIL images. Returns scores by id and seconds."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image, ImageOps
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    model = BlipForImageTextRetrieval.from_pretrained(checkpoint).eval()
    scores = {}
    for batch in pq.ParquetFile(catalog / "catalog.parquet").iter_batches(batch_size=batch_size):
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        images = [ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB") for b in batch.column("image").to_pylist()]
        inputs = processor(
            images=images, text=texts, padding=True, truncation=True, max_length=max_text_tokens, return_tensors="pt"
        )
        with torch.no_grad():
            itm = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[:, 1]
            itc = model(**inputs, use_itm_head=False).itm_score.diagonal()
        for row_id, c, m in zip(ids, itc.tolist(), itm.tolist()):
            scores[row_id] = (c, m)
    return scores, time.perf_counter() - started


def pipeline(checkpoint: str, catalog: Path, output: Path, batch_size: int, ray_cpus: int, score_cpus: float, score_actors: str) -> tuple[dict, float]:
    """``run_job`` on a local Ray started before the clock. Returns scores by id and seconds."""
    import pyarrow.parquet as pq
    import ray

    from pipelines.config import build_config
    from pipelines.run import run_job

    if not ray.is_initialized():
        ray.init(num_cpus=ray_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    config = build_config(
        {
            "input": str(catalog),
            "output": str(output),
            "itm_model": checkpoint,
            "caption_model": "none",
            "device": "cpu",
            "precision": "fp32",
            "score_batch_size": batch_size,
            "decode_batch_size": batch_size,
            "score_cpus": score_cpus,
            "score_actors": score_actors,
        }
    )
    started = time.perf_counter()
    summary = run_job(config)
    elapsed = time.perf_counter() - started
    table = pq.read_table(output, columns=["id", "itc_score", "itm_score"]).to_pylist()
    if summary.rows_written != len(table):
        raise RuntimeError(f"pipeline wrote {summary.rows_written} rows, read back {len(table)}")
    return {r["id"]: (r["itc_score"], r["itm_score"]) for r in table}, elapsed


def model_only(checkpoint: str, batch_size: int, batches: int) -> dict:
    """Seconds per batch of the model calls alone, same inputs, same threads, in this process:
    this project's one-pass scorer against the two ``BlipForImageTextRetrieval`` calls."""
    import numpy as np
    import torch
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    from blip_ops.scorer import BlipScorer

    scorer = BlipScorer.from_pretrained(checkpoint, device="cpu", precision="fp32")
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    model = BlipForImageTextRetrieval.from_pretrained(checkpoint).eval()
    rng = np.random.RandomState(0)
    size = scorer.images.height
    images = [rng.randint(0, 256, (3, size, size), dtype=np.uint8) for _ in range(batch_size)]
    texts = [f"a {c} circle on a white background" for c in ("red", "green", "blue", "yellow")] * (batch_size // 4 + 1)
    texts = texts[:batch_size]
    inputs = processor(
        images=images, text=texts, padding=True, truncation=True, max_length=35, return_tensors="pt",
        images_kwargs={"input_data_format": "channels_first", "do_resize": False},
    )

    def naive():
        with torch.no_grad():
            model(**inputs, use_itm_head=True)
            model(**inputs, use_itm_head=False)

    def ours():
        scorer.score(images, texts)

    timings = {}
    for name, step in (("naive", naive), ("pipeline", ours)):
        step()  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            step()
        timings[name] = (time.perf_counter() - started) / batches
    return {
        "threads": torch.get_num_threads(),
        "naive_s_per_batch": round(timings["naive"], 3),
        "pipeline_s_per_batch": round(timings["pipeline"], 3),
        "ratio": round(timings["naive"] / timings["pipeline"], 2),
    }


PROGRESS_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) progress: (\d+)")


def _fresh_process(command: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {result.returncode}: {result.stderr[-3000:]}")
    return result, elapsed


def steady_rate(stderr: str) -> dict | None:
    """From the job's progress lines: when the first rows were scored, and the rate after that."""
    points = []
    for line in stderr.splitlines():
        match = PROGRESS_LINE.match(line)
        if match:
            points.append((time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")), int(match.group(2))))
    moving = [(t, n) for t, n in points if n > 0]
    if len(moving) < 2:
        return None
    (t0, n0), (t1, n1) = moving[0], moving[-1]
    return {"first_rows_after_s": round(t0 - points[0][0], 1), "rows": n1 - n0, "seconds": t1 - t0,
            "pairs_per_s": round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else None}


def defaults_run(
    checkpoint: str, catalog: Path, workdir: Path, rows: int, datajuicer: tuple = (None, "skipped"), naive: bool = True
) -> dict:
    """Naive loop and ``python -m jobs.score`` at its defaults, each a fresh process, timed to its exit.
    ``naive=False`` (``--no-naive``) runs only the pipeline and Data-Juicer: the ratio fields are None."""
    import pyarrow.parquet as pq

    naive_s, naive_scores = None, None
    if naive:
        scores_file = workdir / "naive-scores.json"
        _, naive_s = _fresh_process([sys.executable, "-m", "benchmarks.cpu_bench", "--naive-only", checkpoint, str(catalog), str(scores_file)])
        naive_scores = {k: tuple(v) for k, v in json.loads(scores_file.read_text()).items()}
    load_between = [round(x, 2) for x in os.getloadavg()]
    output = workdir / f"scored-defaults-{int(time.time())}"
    command = [
        sys.executable, "-m", "jobs.score", "--input", str(catalog), "--output", str(output),
        "--itm-model", checkpoint, "--caption-model", "none", "--device", "cpu", "--json",
    ]
    # Progress lines every 5 s (instead of 15) only to read the steady rate; no setting of the job changes.
    env = dict(os.environ, BLIP_MODERATE_PROGRESS_INTERVAL_S="5")
    result, pipe_s = _fresh_process(command, env)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((output / "_manifest.json").read_text()) if (output / "_manifest.json").exists() else {}
    table = pq.read_table(output, columns=["id", "itc_score", "itm_score"]).to_pylist()
    pipe_scores = {r["id"]: (r["itc_score"], r["itm_score"]) for r in table}
    steady = steady_rate(result.stderr)
    naive_rate = rows / naive_s if naive else None
    run = {
        "mode": "defaults",
        "rows": rows,
        "naive_s": round(naive_s, 1) if naive else None,
        "pipeline_s": round(pipe_s, 1),
        "pipeline_run_job_s": summary.get("elapsed_s") and round(summary["elapsed_s"], 1),
        "naive_pairs_per_s": round(naive_rate, 2) if naive else None,
        "pipeline_pairs_per_s": round(rows / pipe_s, 2),
        "ratio": round(naive_s / pipe_s, 2) if naive else None,
        "steady": steady,
        "steady_ratio": round(steady["pairs_per_s"] / naive_rate, 2) if naive and steady and steady["pairs_per_s"] else None,
        "max_score_difference": max_difference(naive_scores, pipe_scores) if naive else None,
        "pipeline_resources": manifest.get("resources"),
        "pipeline_command": " ".join(command[1:]),
        "load_average_between": load_between,
    }
    run["load_average_after_pipeline"] = [round(x, 2) for x in os.getloadavg()]
    add_datajuicer(run, *datajuicer, checkpoint, catalog, workdir, rows, pipe_scores, pipe_s)
    return run


DATAJUICER_VENV = Path(__file__).resolve().parents[1] / ".venv-datajuicer"
DJ_OP = "image_text_matching_filter"
# tqdm's bar for the op's scoring pass: "image_text_matching_filter_compute_stats (num_proc=2):  45%|...| 9/20 [00:10<00:05, ...]"
DJ_PROGRESS = re.compile(DJ_OP + r"_compute_stats(?: \(num_proc=(\d+)\))?:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)")
DJ_OP_DONE = re.compile(r"OP \[" + DJ_OP + r"\] Done in ([0-9.]+)s")
DJ_IMAGE_TOKEN = "<__dj__image>"  # Data-Juicer's defaults (data_juicer.utils.mm_utils.SpecialTokens)
DJ_EOC_TOKEN = "<|__dj__eoc|>"


def find_datajuicer(choice: str | None) -> tuple[str | None, str | None]:
    """The Data-Juicer venv's python, or None and why the side is skipped."""
    if choice and choice.lower() == "none":
        return None, "skipped: --datajuicer none"
    python = Path(choice) if choice else DATAJUICER_VENV / "bin" / "python"
    if python.is_dir():  # the venv itself
        python = python / "bin" / "python"
    if not python.exists():
        how = f"{python} does not exist" if choice else f"no Data-Juicer venv at {DATAJUICER_VENV}"
        return None, f"skipped: {how} (bash benchmarks/datajuicer/setup.sh makes one)"
    if not (python.parent / "dj-process").exists():
        return None, f"skipped: no dj-process beside {python} (not a Data-Juicer venv)"
    return str(python), None


def write_datajuicer_input(catalog: Path, path: Path) -> Path:
    """The catalog's rows in Data-Juicer's multimodal layout: the text carries one image token and
    ends its chunk, ``images`` names the image (the row id: there is no file) and ``image_bytes``
    holds the same JPEG bytes the other sides decode, which Data-Juicer loads in preference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(catalog / "catalog.parquet", columns=["id", "text", "image"])
    ids = table.column("id").to_pylist()
    texts = [f"{DJ_IMAGE_TOKEN} {t} {DJ_EOC_TOKEN}" for t in table.column("text").to_pylist()]
    blobs = table.column("image").to_pylist()
    pq.write_table(
        pa.table({"id": ids, "text": texts, "images": [[i] for i in ids], "image_bytes": pa.array([[b] for b in blobs], pa.list_(pa.binary()))}),
        path,
    )
    return path



def datajuicer_config(dataset: Path, export: Path, checkpoint: str) -> dict:
    """dj-process's config: the op at its defaults but ``min_score`` 0, and the stats kept in the output."""
    return {
        "project_name": "cpu-bench",
        "dataset_path": str(dataset),
        "export_path": str(export),
        "keep_stats_in_res_ds": True,
        "process": [{DJ_OP: {"hf_blip": checkpoint, "min_score": 0.0, "max_score": 1.0}}],
    }


def datajuicer_progress(stderr: str) -> dict:
    """From dj-process's stderr: the op's processes, its own time, and the steady rate of its
    scoring bar (from its first scored rows to its last update, so after the models loaded)."""
    points, num_proc = [], None
    for line in re.split(r"[\r\n]", stderr):
        match = DJ_PROGRESS.search(line)
        if match:
            num_proc = int(match.group(1)) if match.group(1) else num_proc
            hours, minutes, seconds = int(match.group(4) or 0), int(match.group(5)), int(match.group(6))
            points.append((3600 * hours + 60 * minutes + seconds, int(match.group(2))))
    done = DJ_OP_DONE.search(stderr)
    result = {"num_proc": num_proc, "op_s": float(done.group(1)) if done else None, "steady": None}
    moving = [(t, n) for t, n in points if n > 0]
    if len(moving) >= 2:
        (t0, n0), (t1, n1) = moving[0], moving[-1]
        result["steady"] = {"first_rows_after_s": t0, "rows": n1 - n0, "seconds": t1 - t0,
                            "pairs_per_s": round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else None}
    return result


def datajuicer_scores(rows: list[dict]) -> dict:
    """``{id: itm}`` from Data-Juicer's output rows; one score per row (one image, one chunk) or an error.
    Its Parquet export stores the stats column as JSON text (an ``arrow.json`` column)."""
    scores = {}
    for row in rows:
        stats = row.get("__dj__stats__") or {}
        stats = json.loads(stats) if isinstance(stats, str) else stats
        values = stats.get("image_text_matching_score") or []
        if len(values) != 1:
            raise RuntimeError(f"Data-Juicer gave row {row.get('id')!r} {len(values)} ITM scores, expected 1")
        scores[row["id"]] = float(values[0])
    return scores


def itm_difference(ours: dict, theirs: dict) -> float:
    """Largest |ITM difference| between this project's ``{id: (itc, itm)}`` and Data-Juicer's ``{id: itm}``."""
    if ours.keys() != theirs.keys():
        missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        raise RuntimeError(f"Data-Juicer scored different rows: missing {missing[:5]}, extra {extra[:5]}")
    return max(abs(ours[k][1] - theirs[k]) for k in ours)


def datajuicer_side(python: str, checkpoint: str, catalog: Path, workdir: Path) -> tuple[dict, dict]:
    """Data-Juicer's ``dj-process`` in its own venv, a fresh process timed to its exit. Returns its
    ITM scores by id and its figures (seconds, num_proc, op time, steady rate, versions)."""
    import pyarrow.parquet as pq

    run = workdir / f"datajuicer-{int(time.time())}"  # a new dataset file: nothing comes from a datasets cache
    run.mkdir(parents=True)
    dataset = write_datajuicer_input(catalog, run / "input.parquet")
    export = run / "out" / "scored.parquet"
    config = run / "config.yaml"
    config.write_text(json.dumps(datajuicer_config(dataset, export, checkpoint), indent=2))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(run / "hf-datasets-cache"))
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(*(m.version(p) for p in ('py-data-juicer', 'torch', 'transformers')))"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.split()
    command = [str(Path(python).parent / "dj-process"), "--config", str(config)]
    result, seconds = _fresh_process(command, env)
    (run / "dj-process.stderr").write_text(result.stderr)
    scores = datajuicer_scores(pq.read_table(export, columns=["id", "__dj__stats__"]).to_pylist())
    figures = {"s": round(seconds, 1), **datajuicer_progress(result.stderr),
               "versions": dict(zip(("py-data-juicer", "torch", "transformers"), versions)),
               "command": " ".join(command), "config": datajuicer_config(dataset, export, checkpoint)["process"]}
    return scores, figures


def add_datajuicer(result: dict, python: str | None, skipped: str | None, checkpoint: str, catalog: Path,
                   workdir: Path, rows: int, pipe_scores: dict, pipe_s: float) -> None:
    """Runs the third side when there is a venv and puts it beside the others in ``result``. A
    failure of that side is recorded, not raised: the two sides before it took minutes."""
    if python is None:
        result["datajuicer"] = {"skipped": skipped}
        return
    try:
        dj_scores, figures = datajuicer_side(python, checkpoint, catalog, workdir)
        figures["max_itm_difference_vs_pipeline"] = itm_difference(pipe_scores, dj_scores)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        result["datajuicer"] = {"failed": f"{type(error).__name__}: {detail[-2000:]}"}
        return
    figures["pairs_per_s"] = round(rows / figures["s"], 2)
    figures["pipeline_vs_datajuicer"] = round(figures["s"] / pipe_s, 2)  # > 1: the pipeline is ahead
    ours, theirs = (result.get("steady") or {}).get("pairs_per_s"), (figures["steady"] or {}).get("pairs_per_s")
    figures["pipeline_vs_datajuicer_steady"] = round(ours / theirs, 2) if ours and theirs else None
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["datajuicer"] = figures


def datajuicer_lines(result: dict) -> str:
    dj = result.get("datajuicer") or {}
    if "skipped" in dj:
        return f"Data-Juicer ITM filter               : {dj['skipped']}\n"
    if "failed" in dj:
        return f"Data-Juicer ITM filter               : FAILED, {dj['failed'].strip().splitlines()[-1]}\n"
    steady = dj.get("steady") or {}
    ratio = dj.get("pipeline_vs_datajuicer_steady")
    versus = f" (pipeline's steady rate {ratio}x it)" if ratio else ""
    return (
        f"Data-Juicer ITM filter (fresh)       : {dj['pairs_per_s']:8.2f} pairs/s ({dj['s']} s; "
        f"py-data-juicer {dj['versions'].get('py-data-juicer')}, num_proc {dj['num_proc']}, op {dj['op_s']} s)\n"
        f"pipeline vs Data-Juicer end to end   : {dj['pipeline_vs_datajuicer']:.2f}x   (max |ITM difference| {dj['max_itm_difference_vs_pipeline']:.2e})\n"
        f"Data-Juicer steady (after first rows): {steady.get('pairs_per_s')} pairs/s{versus}; "
        f"first rows {steady.get('first_rows_after_s')} s into its bar\n"
    )


def max_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise RuntimeError("the two sides scored different rows")
    return max(max(abs(x[0] - y[0]), abs(x[1] - y[1])) for x, y in ((a[k], b[k]) for k in a))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1536, help="the pipeline's fixed start-up (about 25 s on 2 cores) weighs less the more rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=256, help="hidden size of both towers (BLIP-base: 768)")
    parser.add_argument("--depth", type=int, default=4, help="layers in each tower (BLIP-base: 12)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray (oversubscribing the cores lets decoding overlap the model)")
    parser.add_argument("--score-cpus", type=float, default=1, help="CPUs per scoring actor; torch in the actor gets floor(this) threads")
    parser.add_argument("--score-actors", default="2,2", help="two single-thread actors beat one two-thread actor on small matrices")
    parser.add_argument("--model-batches", type=int, default=3, help="batches for the model-only comparison (0 skips it)")
    parser.add_argument("--workdir", help="keep the checkpoint, catalog and output here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--defaults", action="store_true",
        help="the headline: each side a fresh process, jobs.score at its CLI defaults, the mid-size checkpoint "
        "(width 384, depth 6 unless set); the tuned --ray-cpus/--score-* settings are not used",
    )
    parser.add_argument("--distinct", action="store_true", help="number every title: no two rows share a pair (what dedup cannot collapse)")
    parser.add_argument(
        "--datajuicer", metavar="PYTHON",
        help="the third side: the python of a Data-Juicer venv (default: .venv-datajuicer/bin/python if it exists, "
        "else skipped; 'none' skips it)",
    )
    parser.add_argument("--no-naive", action="store_true", help="with --defaults: skip the naive loop (pipeline and Data-Juicer only; prints JSON)")
    parser.add_argument("--naive-only", nargs=3, metavar=("CHECKPOINT", "CATALOG", "SCORES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.naive_only:  # the naive side of --defaults, in its own process
        checkpoint, catalog, scores_file = args.naive_only
        scores, _ = naive_baseline(checkpoint, Path(catalog), args.batch_size)
        Path(scores_file).write_text(json.dumps(scores))
        return 0

    datajuicer = find_datajuicer(args.datajuicer)
    if args.datajuicer and args.datajuicer.lower() != "none" and datajuicer[0] is None:
        print(f"--datajuicer: {datajuicer[1].removeprefix('skipped: ')}", file=sys.stderr)
        return 2

    from blip_ops.tiny import build_bench_itm

    if args.defaults:
        args.width = 384 if args.width == parser.get_default("width") else args.width
        args.depth = 6 if args.depth == parser.get_default("depth") else args.depth
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="blip-cpu-bench-"))
    before = machine()
    checkpoint = str(build_bench_itm(workdir / "itm", width=args.width, depth=args.depth, image_size=args.image_size))
    catalog = write_catalog(workdir / "catalog", args.rows, rows_per_group=2 * args.batch_size, distinct=args.distinct)

    if args.defaults:
        result = defaults_run(checkpoint, catalog, workdir, args.rows, datajuicer, naive=not args.no_naive)
        result.update(
            checkpoint={"layout": "BLIP-base", "width": args.width, "depth": args.depth, "image_size": args.image_size},
            naive_batch_size=args.batch_size,
            machine=before,
            load_average_after=[round(x, 2) for x in os.getloadavg()],
            date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        )
        if args.json or args.no_naive:
            print(json.dumps(result, sort_keys=True))
        else:
            steady = result["steady"] or {}
            print(
                f"naive HF loop (fresh process)        : {result['naive_pairs_per_s']:8.2f} pairs/s ({result['naive_s']} s)\n"
                f"jobs.score at its defaults (fresh)   : {result['pipeline_pairs_per_s']:8.2f} pairs/s ({result['pipeline_s']} s)\n"
                f"ratio end to end                     : {result['ratio']:.2f}x   (max |score difference| {result['max_score_difference']:.2e})\n"
                f"steady state (after the first rows)  : {steady.get('pairs_per_s')} pairs/s, {result['steady_ratio']}x; "
                f"first rows {steady.get('first_rows_after_s')} s after the run's first progress line\n"
                + datajuicer_lines(result)
                + f"rows {args.rows}, checkpoint width {args.width} depth {args.depth} at {args.image_size} px; "
                f"load average {before['load_average']} -> {result['load_average_between']} -> {result['load_average_after']}"
            )
        return 0

    naive_scores, naive_s = naive_baseline(checkpoint, catalog, args.batch_size)
    load_between = [round(x, 2) for x in os.getloadavg()]
    output = workdir / f"scored-{int(time.time())}"
    pipe_scores, pipe_s = pipeline(
        checkpoint, catalog, output, args.batch_size, args.ray_cpus, args.score_cpus, args.score_actors
    )
    load_after_pipeline = [round(x, 2) for x in os.getloadavg()]
    model_stage = model_only(checkpoint, args.batch_size, args.model_batches) if args.model_batches else None
    result = {
        "model_only": model_stage,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "checkpoint": {"layout": "BLIP-base", "width": args.width, "depth": args.depth, "image_size": args.image_size},
        "naive_pairs_per_s": round(args.rows / naive_s, 2),
        "pipeline_pairs_per_s": round(args.rows / pipe_s, 2),
        "ratio": round(naive_s / pipe_s, 2),
        "naive_s": round(naive_s, 1),
        "pipeline_s": round(pipe_s, 1),
        "max_score_difference": max_difference(naive_scores, pipe_scores),
        "pipeline_settings": {"ray_cpus": args.ray_cpus, "score_cpus": args.score_cpus, "score_actors": args.score_actors},
        "machine": before,
        "load_average_between": load_between,
        "load_average_after_pipeline": load_after_pipeline,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    add_datajuicer(result, *datajuicer, checkpoint, catalog, workdir, args.rows, pipe_scores, pipe_s)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"naive HF loop : {result['naive_pairs_per_s']:8.2f} pairs/s ({result['naive_s']} s)\n"
            f"this pipeline : {result['pipeline_pairs_per_s']:8.2f} pairs/s ({result['pipeline_s']} s)\n"
            f"ratio         : {result['ratio']:.2f}x   (max |score difference| {result['max_score_difference']:.2e})\n"
            + (
                f"model calls only ({model_stage['threads']} threads, s/batch): naive {model_stage['naive_s_per_batch']}, "
                f"pipeline {model_stage['pipeline_s_per_batch']}, ratio {model_stage['ratio']:.2f}x\n"
                if model_stage
                else ""
            )
            + datajuicer_lines(result)
            + f"rows {args.rows}, batch {args.batch_size}, checkpoint BLIP-base layout width {args.width} depth "
            f"{args.depth} at {args.image_size} px; load average {before['load_average']} -> {result['load_average_after']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
