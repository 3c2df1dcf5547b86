"""``python -m jobs.demo``: score a generated sample catalog end to end on a local Ray.

Uses the real default checkpoints when they are already in the local Hugging Face cache;
otherwise builds tiny random ones and says so, since their scores mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.config import DEFAULT_CAPTION_MODEL, DEFAULT_ITM_MODEL

RANDOM_WEIGHTS_WARNING = (
    "NOTE: the real checkpoints are not in the local Hugging Face cache, so this demo uses tiny "
    "RANDOM-WEIGHT models built on the spot. Their scores, flags and captions are meaningless; "
    "the demo only shows the pipeline working end to end."
)


def _cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json")
    return isinstance(found, str) and os.path.exists(found)


def choose_models(workdir: Path) -> tuple[str, str, bool]:
    """``(itm_model, caption_model, real)``."""
    if _cached(DEFAULT_ITM_MODEL) and _cached(DEFAULT_CAPTION_MODEL):
        return DEFAULT_ITM_MODEL, DEFAULT_CAPTION_MODEL, True
    from blip_ops.tiny import build_tiny_checkpoints

    itm, caption = build_tiny_checkpoints(workdir / "tiny-models")
    return str(itm), str(caption), False


def write_sample_catalog(directory: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blip_ops.samples import sample_catalog

    directory.mkdir(parents=True, exist_ok=True)
    records = sample_catalog(rows)
    half = len(records) // 2
    for index, chunk in enumerate((records[:half], records[half:])):
        pq.write_table(pa.Table.from_pylist(chunk), directory / f"catalog-{index}.parquet")
    return directory


def main(argv: list[str] | None = None, prog: str = "python -m jobs.demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_output", help="Where the catalog, models and output go.")
    parser.add_argument("--rows", type=int, default=36, help="Records in the sample catalog.")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join; default starts a local Ray.")
    args = parser.parse_args(argv)

    from pipelines.config import build_config
    from pipelines.run import run_job

    workdir = Path(args.workdir).resolve()
    itm_model, caption_model, real = choose_models(workdir)
    if not real:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    catalog = write_sample_catalog(workdir / "catalog", args.rows)
    config = build_config(
        dict(
            input=str(catalog),
            output=str(workdir / "scored"),
            overwrite=True,
            itm_model=itm_model,
            caption_model=caption_model,
            max_new_tokens=30 if real else 8,
            ray_address=args.ray_address,
        )
    )
    summary = run_job(config)
    print(summary.render())
    _show_flagged(summary.output)
    if not real:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    return 0


def _show_flagged(output: str, limit: int = 8) -> None:
    import pyarrow.parquet as pq

    columns = ["id", "expected", "text", "itm_score", "itc_score", "status", "flag_reasons", "caption"]
    rows = [r for r in pq.read_table(output, columns=columns).to_pylist() if r["flag_reasons"]]
    print(f"\nfirst {min(limit, len(rows))} of {len(rows)} flagged rows:")
    for row in rows[:limit]:
        scores = "" if row["itm_score"] is None else f"itm={row['itm_score']:.3f} itc={row['itc_score']:.3f} "
        print(
            f"  {row['id']} [{row['expected']}] text={row['text']!r} {scores}"
            f"reasons={row['flag_reasons']} caption={row['caption']!r}"
        )


if __name__ == "__main__":
    sys.exit(main())
