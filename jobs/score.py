"""``python -m jobs.score``: score a Parquet catalog and write scored Parquet.

Exit codes: 0 success; 2 usage, configuration or input error (found before any model
loads); 1 the run failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import UsageParser
from pipelines.config import DEFAULT_CAPTION_MODEL, DEFAULT_ITM_MODEL, ConfigError, build_config, load_yaml
from pipelines.preflight import InputError, preflight

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Flags whose value is spelled like the config field (dashes for underscores).
_OPTIONS = [
    ("--input", "Parquet file, directory (hive partitions allowed) or URI (file://, s3://, gs://, az://, abfs[s]://) (required)."),
    ("--output", "Output directory or prefix (file://, s3://, gs://, az://, abfs[s]://) (required)."),
    ("--output-format", "parquet (default: Parquet files, _manifest.json, _SUCCESS) | delta (a Delta Lake table, one commit per run)."),
    ("--target-file-mb", "Size of the committed output's files in MB: staged pieces are merged, in row order, into files of about this size (default 128)."),
    ("--itm-model", f"BLIP image-text retrieval checkpoint: hub id, local directory or store URI (default {DEFAULT_ITM_MODEL})."),
    ("--caption-model", f"BLIP-2 checkpoint, or 'none' to skip captioning (default {DEFAULT_CAPTION_MODEL})."),
    ("--captions", "Which rows to caption: all | flagged | none (default all; none without a caption model)."),
    ("--caption-prompt", "Prompt the caption continues (default: none)."),
    ("--max-new-tokens", "Most tokens per caption (default 30)."),
    ("--agreement-model", "Sentence model for caption_agreement (default sentence-transformers/all-MiniLM-L6-v2, packaged; 'none' off)."),
    ("--agreement-threshold", "Flag caption_disagrees when caption_agreement is below this (default none: off)."),
    ("--itm-threshold", "Flag rows with itm_score below this (default 0.5; 'none' turns it off)."),
    ("--itc-threshold", "Flag rows with itc_score below this (default 0.2; 'none' turns it off)."),
    ("--max-text-tokens", "Truncate texts to this many tokens (default 35)."),
    ("--text-languages", "Languages the ITM model reads, ISO 639-1, comma-separated (default en); others are flagged; 'any' off."),
    ("--evidence", "Grad-CAM evidence maps for: flagged (default: rows flagged by score) | all (scored rows) | none."),
    ("--evidence-layer", "ITM text-encoder layer to explain (default auto: 6 of 12, else the middle)."),
    ("--id-column", "Record id column (default id)."),
    ("--text-column", "Text column (default text)."),
    ("--image-column", "Image bytes column (default image)."),
    ("--image-uri-column", "Column of image locations (paths, s3://, gs://, az://, http(s):// URLs), used instead of image bytes (default: none, bytes in --image-column)."),
    ("--device", "auto | cpu | cuda (default auto)."),
    ("--precision", "auto | fp32 | bf16 | fp16 | bf16-weights (default auto: bf16 autocast on CUDA, fp32 on CPU; bf16-weights: weights in bf16, no autocast)."),
    ("--overlap", "auto | on | off: two batches in flight per model actor, host work beside the model's (default auto: on with a GPU, off on the CPU)."),
    ("--shape-buckets", "on | off: pad scoring batches to bucketed shapes (rows to a power of two, texts to 8 tokens) for compiled models (default off)."),
    ("--torch-compile", "on | off: torch.compile the scorer's encoders on CUDA, with shape buckets (default off; ignored on the CPU)."),
    ("--vision-attention", "fused (default: PyTorch SDPA, scores within 5e-7 of eager in fp32) | eager (transformers' own, bit for bit)."),
    ("--cpu-kernels", "auto | onednn | torch: matrix kernels of CPU scoring's image side (default auto: oneDNN on AMD x86-64, a score call 1.6x faster on an AMD EPYC, level on an Intel Xeon, so torch's there; scores within 5.4e-7; torch: bit for bit)."),
    ("--ray-address", "Ray cluster to join ('auto' or an address); default starts a local Ray."),
    ("--score-actors", "Scoring actor pool MIN,MAX, or auto (default: 1 up to the GPUs the cluster has)."),
    ("--caption-actors", "Captioning actor pool MIN,MAX, or auto (default: 1 up to the GPUs the cluster has)."),
    ("--score-gpus", "GPUs per scoring actor; fractions share a GPU (default 1 if the cluster has GPUs or --device cuda, else 0)."),
    ("--caption-gpus", "GPUs per captioning actor; fractions share a GPU (default 1 if the cluster has GPUs or --device cuda, else 0)."),
    ("--score-cpus", "CPUs reserved per scoring actor (default: 1 with a GPU, else a share of the cluster)."),
    ("--caption-cpus", "CPUs reserved per captioning actor (default: 1 with a GPU, else a share of the cluster)."),
    ("--score-batch-size", "Rows per scoring batch (default auto: 256 on a GPU, 64 on the CPU)."),
    ("--caption-batch-size", "Rows per captioning batch (default auto: 512 on a GPU, called in as many rows as free GPU memory holds; 16 on the CPU)."),
    ("--decode-batch-size", "Rows per decode batch (default 64)."),
    ("--decode-device", "Where JPEGs are decoded: cpu (default: decode tasks, Pillow) | gpu (model actors, nvJPEG; needs torchvision)."),
    ("--max-image-bytes", "Images larger than this are image_error, never read whole (default 52428800, 50 MiB)."),
    ("--storage-backend", "Client for s3://, gs://, az:// URIs: native (default: pyarrow's own, the faster) | fsspec (s3fs, gcsfs, adlfs)."),
    ("--http-timeout", "Seconds an image URL may take to connect, between reads, and in all per attempt (default 10)."),
    ("--http-concurrency", "Image URLs fetched side by side per decode task (default 16)."),
    ("--http-per-host", "Most connections per host per decode task (default 4)."),
    ("--http-retries", "Retries of an image URL after connection errors, 429 and 5xx, honouring Retry-After (default 3)."),
    ("--http-user-agent", "User-Agent of image URL requests (default names this job)."),
    ("--run-id", "Run identifier (default: generated)."),
    ("--report-category-column", "Column the run report breaks the flag rate down by (default: none)."),
    ("--embeddings", "none (default) | image | both: write the normalised ITC projections as fixed_size_list<float16>[D] columns."),
    ("--near-duplicate-cosine", "With --near-duplicates: image-embedding cosine at or above which images group (default 0.95)."),
    ("--labels", "Label file (YAML: prompt, categories, policies): category and policy labels from the scoring pass (default none)."),
    ("--reuse", "Committed outputs of earlier runs, PATH[,PATH...] (local or store URIs): rows with the same content key take their scores and captions (default: none)."),
]


JPEG_DRAFT_FLAG = "--jpeg-draft"
JPEG_DRAFT_HELP = "Decode large JPEGs at reduced scale: less decode CPU, slightly different pixels and scores (default off)."


HTTP_ALLOW_PRIVATE_FLAG = "--http-allow-private"
HTTP_ALLOW_PRIVATE_HELP = ("Fetch image URLs on loopback, link-local and private addresses (a private CDN); default off: "
                           "refused, as an image_error 'refused: private address'.")


NO_DEDUP_FLAG = "--no-dedup"
NO_DEDUP_HELP = "Score and caption row by row, duplicates included (no keyed plan; for comparisons; default off)."


# --help shows the options in these groups, in this order; every flag of jobs.score and jobs.nightly
# names its group in OPTION_GROUPS (a flag without one stops make_parser, and tests/jobs/test_help.py).
INPUT_OUTPUT = "input and output"
MODELS = "models"
THRESHOLDS = "thresholds and signals"
EVIDENCE = "evidence and labels"
REUSE = "reuse"
RESOURCES = "resources and cluster"
SPEED = "speed, rarely changed"
GROUPS = [INPUT_OUTPUT, MODELS, THRESHOLDS, EVIDENCE, REUSE, RESOURCES, SPEED]

OPTION_GROUPS = {
    **dict.fromkeys(
        ["--config", "--input", "--output", "--output-format", "--overwrite", "--id-column", "--text-column",
         "--image-column", "--image-uri-column", "--max-image-bytes", "--run-id", "--report-category-column",
         "--json", "--catalog", "--date", "--target-file-mb", "--storage-backend", "--http-timeout",
         "--http-concurrency", "--http-per-host", "--http-retries", "--http-user-agent", "--http-allow-private"],
        INPUT_OUTPUT,
    ),
    **dict.fromkeys(
        ["--itm-model", "--caption-model", "--captions", "--caption-prompt", "--max-new-tokens", "--max-text-tokens",
         "--agreement-model", "--device", "--precision"],
        MODELS,
    ),
    **dict.fromkeys(["--itm-threshold", "--itc-threshold", "--agreement-threshold", "--text-languages"], THRESHOLDS),
    **dict.fromkeys(["--evidence", "--evidence-layer", "--labels", "--embeddings", "--near-duplicates",
                     "--near-duplicate-cosine"], EVIDENCE),
    **dict.fromkeys(["--reuse", "--no-dedup", "--reuse-days", "--no-reuse"], REUSE),
    **dict.fromkeys(
        ["--ray-address", "--score-actors", "--caption-actors", "--score-gpus", "--caption-gpus", "--score-cpus",
         "--caption-cpus", "--score-batch-size", "--caption-batch-size", "--decode-batch-size"],
        RESOURCES,
    ),
    **dict.fromkeys(
        ["--overlap", "--shape-buckets", "--torch-compile", "--vision-attention", "--cpu-kernels", "--decode-device",
         "--jpeg-draft"],
        SPEED,
    ),
}


def grouped(parser: argparse.ArgumentParser):
    """``add(flag, **kwargs)``: add_argument into the flag's help group (groups made in GROUPS order)."""
    sections = {name: parser.add_argument_group(name) for name in GROUPS}

    def add(flag: str, **kwargs):
        if flag not in OPTION_GROUPS:
            raise KeyError(f"{flag} has no help group: name one for it in jobs.score.OPTION_GROUPS")
        return sections[OPTION_GROUPS[flag]].add_argument(flag, **kwargs)

    return add


NEAR_DUPLICATES_FLAG = "--near-duplicates"
NEAR_DUPLICATES_HELP = ("Group rows by image: same file, or image-embedding cosine >= --near-duplicate-cosine "
                        "(columns image_group, image_group_size; implies --embeddings image; default off).")


def add_switches(add) -> None:
    """The on/off options jobs.score and jobs.nightly share (``add``: ``grouped(parser)``)."""
    add(JPEG_DRAFT_FLAG, action="store_true", help=JPEG_DRAFT_HELP)
    add(HTTP_ALLOW_PRIVATE_FLAG, dest="http_allow_private", action="store_true", help=HTTP_ALLOW_PRIVATE_HELP)
    add(NO_DEDUP_FLAG, dest="dedup", action="store_false", help=NO_DEDUP_HELP)
    add(NEAR_DUPLICATES_FLAG, dest="near_duplicates", action="store_true", help=NEAR_DUPLICATES_HELP)


def make_parser(prog: str = "python -m jobs.score") -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=prog, usage="%(prog)s --input PATH --output PATH [options]", description=__doc__.splitlines()[0],
        argument_default=argparse.SUPPRESS,
    )
    add = grouped(parser)
    add("--config", help="YAML file of options (same names, with underscores); flags override it (default: none).")
    for flag, help_text in _OPTIONS:
        add(flag, help=help_text)
    add("--overwrite", action="store_true", help="Replace an existing result in --output (default off).")
    add_switches(add)
    add("--json", action="store_true", help="Print the summary as JSON (default: one line of text).")
    return parser


def config_from_args(args: argparse.Namespace):
    values = vars(args).copy()
    values.pop("json", None)
    config_file = values.pop("config", None)
    merged = load_yaml(config_file) if config_file else {}
    merged.update(values)
    return build_config(merged)


def main(argv: list[str] | None = None, prog: str = "python -m jobs.score") -> int:
    args = make_parser(prog).parse_args(argv)
    try:
        config = config_from_args(args)
        checked = preflight(config)
        from pipelines.run import (
            run_job,  # imports Ray and torch: only once everything checkable is good
        )

        summary = run_job(config, checked)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; nothing was committed (rerun the same command to resume)", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        print(
            f"error: run failed: {type(exc).__name__}: {exc}\n"
            "nothing was committed; rerun the same command to resume from the rows already written",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps(summary.as_dict(), sort_keys=True) if getattr(args, "json", False) else summary.render())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
