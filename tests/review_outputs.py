"""A committed jobs.score output without Ray or models, for the review-queue tests.

The rows have the real output schema (``pipelines.schema.output_schema``) and are committed by the
real committers (Parquet, or Delta), so readers see exactly what a run leaves; only the scores are
drawn instead of computed. The catalog is ``blip_ops.samples``' drawn shapes with their titles, half of them wrong
(``expected``), and ITM scores lower for the wrong ones (with overlap), as a real checkpoint's
would be. Images are JPEG bytes in the catalog, or files named by a path column.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from blip_ops.samples import sample_catalog
from pipelines.commit import delta, output
from pipelines.commit.pieces import ROW, UNIT, write_pieces
from pipelines.commit.units import Unit
from pipelines.config import build_config
from pipelines.schema import output_schema
from tests.conftest import write_catalog

RUN_ID = "run-review"
ITM_THRESHOLD = 0.5


def scored_output(root: Path, n: int = 12, uri_images: bool = False, output_format: str = "parquet",
                  evidence: bool = True) -> dict:
    """Writes ``root/catalog`` (and ``root/images``) and commits ``root/scored``; returns what a test needs."""
    rng = np.random.default_rng(7)
    images_dir = root / "images" / "shop"
    records, data, expected = [], [], []
    for i, sample in enumerate(sample_catalog(n, seed=11)):
        payload = sample["image"]
        data.append(payload)
        expected.append(sample["expected"])
        record = {"id": sample["id"], "text": sample["text"], "category": ["shoes", "hats"][i % 2]}
        if uri_images:
            images_dir.mkdir(parents=True, exist_ok=True)
            path = images_dir / f"{i}.jpg"
            path.write_bytes(payload)
            record["image_path"] = str(path)
        else:
            record["image"] = payload
        records.append(record)
    catalog = write_catalog(root / "catalog", records, files=1)
    config = build_config(dict(
        input=str(catalog), output=str(root / "scored"), output_format=output_format, itm_model="tiny-itm",
        itm_threshold=ITM_THRESHOLD, **({"image_uri_column": "image_path"} if uri_images else {}),
    ))
    wrong = np.array([e == "mismatch" for e in expected])
    itm = np.where(wrong, rng.uniform(0.02, 0.55, n), rng.uniform(0.4, 0.98, n)).astype(np.float32)
    itc = (rng.random(n) * 0.5).astype(np.float32)
    # The samples' broken records (an undecodable image, a blank title) could not be checked: flagged, unscored.
    status = [e if e in ("image_error", "text_error") else "ok" for e in expected]
    rows = []
    for i, record in enumerate(records):
        ok = status[i] == "ok"
        flagged = (not ok) or bool(itm[i] < ITM_THRESHOLD)
        reasons = ([] if ok else [status[i]]) + (["itm_below_threshold"] if ok and itm[i] < ITM_THRESHOLD else [])
        grid = rng.random(16).astype(np.float32).tolist()
        row = {k: v for k, v in record.items() if k != "image"}
        row.update(
            itc_score=float(itc[i]) if ok else None, itm_score=float(itm[i]) if ok else None,
            caption=f"a drawing of a {((record['text'] or '').split() or ['shape'])[-1]}" if ok else None, caption_agreement=None, flagged=flagged,
            flag_reasons=reasons, status=status[i], error=None if ok else {"image_error": "undecodable image", "text_error": "blank text"}[status[i]],
            text_truncated=False, text_language="en", run_id=RUN_ID, scored_at=None, itm_model="tiny-itm",
            caption_model=None,
            evidence=({"rows": 4, "cols": 4, "heat": grid, "words": [{"word": "product", "weight": 0.5}], "layer": 1}
                      if evidence and ok and flagged else None),
            image_sha256=hashlib.sha256(data[i]).hexdigest(), text_sha256=hashlib.sha256((record["text"] or "").encode()).hexdigest(),
            scores_from_run=RUN_ID if ok else None, caption_from_run=RUN_ID if ok else None,
        )
        rows.append(row)
    input_schema = pa.Table.from_pylist(records).schema
    schema = output_schema(input_schema, None if uri_images else "image")
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.append_column(UNIT, pa.array([0] * n, pa.int64())).append_column(ROW, pa.array(range(n), pa.int64()))
    committer = delta.DeltaCommitter(config.output) if output_format == "delta" else output.ParquetCommitter()
    location = committer.prepare(config.output, False, "review-key")
    attempt = output.open_attempt(location, "review-key", RUN_ID, committer.read_committed(location))
    write_pieces(table, filesystem=pafs.LocalFileSystem(), staging=attempt.staging, schema=schema)
    committer.commit(location, attempt, [Unit(0, str(catalog / "part-0.parquet"), 0, n)], schema,
                     {"schema_version": 2, "config": config.model_dump(mode="json")})
    return {"config": config, "output": config.output, "rows": rows, "images_dir": root / "images",
            "expected": dict(zip([r["id"] for r in records], expected))}
