"""Notebook search over a committed output's image embeddings: ``similar(output, row_id or image, k=10)``.

    >>> from jobs.similar import similar
    >>> similar("out/", "item-0042", k=5)         # the 5 listings whose photos are nearest item-0042's
    >>> similar("out/", open("photo.jpg", "rb").read())   # a new photo: embedded by audit()'s warm actor

Exact search, streamed: the output's ``image_embedding`` column is read row group by row group
(``CHUNK_ROWS`` at a time) and only the best k rows so far are kept, so memory is one chunk plus k
rows whatever the output's size, and the answer is exact (no index to build, refresh or tune).
The cost is one full read per query: about 512 bytes a row at D = 256, so 1 million rows is 0.5 GB
read and 0.26 GFLOP (well under a second of numpy; a few seconds from object storage). That is why
``EXACT_LIMIT`` is 5 million rows: past it, a query reads several GB, and an approximate index pays for
itself (faiss-cpu's IVF-PQ, or DuckDB's vss, which does not load offline with the pinned DuckDB:
FIELD_NOTES). Beyond the limit ``similar`` refuses unless ``exact=True`` is passed; the index is not built here.
"""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipelines.vectors import to_numpy

CHUNK_ROWS = 65_536
EXACT_LIMIT = 5_000_000


def _output_files(output: str):
    from pipelines.commit import delta
    from pipelines.commit.reader import read_committed
    from pipelines.storage import locate

    location = locate(output)
    table = delta.table_at(location)
    if table is not None:
        manifest = delta.read_committed(table)
        return location, list(delta.committed_files(table)), manifest or {}
    manifest = read_committed(location)
    if manifest is None:
        raise ValueError(f"{output} holds no committed result")
    return location, [location.join(name) for name in manifest.get("files", [])], manifest


def _query_vector(dataset, query, id_column: str, manifest: dict) -> np.ndarray:
    if isinstance(query, (bytes, bytearray)) or hasattr(query, "save"):
        return _embed_image(query, manifest)
    rows = dataset.to_table(columns=["image_embedding"], filter=pc.field(id_column) == query)
    rows = rows.filter(rows.column("image_embedding").is_valid())
    if not rows.num_rows:
        raise KeyError(f"no scored row with {id_column} == {query!r} (or it has no image_embedding)")
    return np.asarray(rows.column("image_embedding")[0].as_py(), dtype=np.float32)


def _embed_image(image, manifest: dict) -> np.ndarray:
    """A new photo's embedding with the output's own checkpoint and settings, from audit()'s warm actor
    (no model loads in the notebook process)."""
    import io

    from jobs.audit import audit

    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    config = manifest.get("config") or {}
    keep = ("itm_model", "precision", "vision_attention", "cpu_kernels", "device", "jpeg_draft", "ray_address")
    options = {k: config[k] for k in keep if config.get(k) is not None}
    frame = audit(pd.DataFrame({"id": ["query"], "text": ["query"], "image": [bytes(image)]}), captions="none",
                  evidence="none", text_languages="any", embeddings="image", **options)
    value = frame["image_embedding"][0]
    if value is None:
        raise ValueError(f"the image could not be scored: {frame['error'][0]}")
    return np.asarray(value, dtype=np.float32)


def similar(output: str, query, k: int = 10, *, id_column: str | None = None, exact: bool = False) -> pd.DataFrame:
    """The ``k`` rows of ``output`` whose image embeddings are nearest ``query`` (a row id, or image
    bytes / a PIL image), nearest first, with a ``cosine`` column and a ``thumbnail`` data URI (read
    back from the run's input; None where it is gone). The query row itself is among them (cosine 1)."""
    location, files, manifest = _output_files(output)
    config = manifest.get("config") or {}
    id_column = id_column or config.get("id_column", "id")
    dataset = pads.dataset(files, filesystem=location.filesystem, format="parquet")
    if "image_embedding" not in dataset.schema.names:
        raise ValueError(f"{output} has no image_embedding column: score it with --embeddings image (or both)")
    if dataset.count_rows() > EXACT_LIMIT and not exact:
        raise ValueError(f"{output} has more than {EXACT_LIMIT} rows: exact search reads them all per query; "
                         "pass exact=True to do it anyway (see jobs.similar's docstring)")
    target = _query_vector(dataset, query, id_column, manifest)
    target = target / max(float(np.linalg.norm(target)), 1e-12)
    text_column = config.get("text_column", "text")
    shown = [c for c in (id_column, text_column, config.get("image_uri_column"), "image_sha256", "itm_score", "itc_score", "flagged",
                         "image_group", "image_group_size") if c and c in dataset.schema.names]
    best: list[tuple] = []  # (cosine, sequence, row), a min-heap of the k best so far
    sequence = 0
    for batch in dataset.to_batches(columns=shown + ["image_embedding"], batch_size=CHUNK_ROWS):
        table = pa.Table.from_batches([batch])
        table = table.filter(table.column("image_embedding").is_valid())
        if not table.num_rows:
            continue
        matrix, _ = to_numpy(table.column("image_embedding"))
        matrix = matrix.astype(np.float32)
        cosine = (matrix @ target) / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
        top = np.argsort(-cosine, kind="stable")[:k]
        rows = table.select(shown).take(pa.array(top)).to_pylist()
        for index, row in zip(top, rows):
            sequence += 1
            item = (float(cosine[index]), -sequence, row)
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    ordered = sorted(best, key=lambda item: (-item[0], -item[1]))
    frame = pd.DataFrame([dict(row, cosine=value) for value, _, row in ordered], columns=shown + ["cosine"])
    frame["thumbnail"] = _thumbnails(config, list(frame[id_column])) if len(frame) else []
    return frame


def _thumbnails(config: dict, ids: list) -> list:
    """Thumbnails read back from the run's input by id (``report.fetch_images``); None where it is gone."""
    from pipelines.config import ConfigError, build_config
    from pipelines.review import views
    from pipelines.review.report import fetch_images

    try:
        images = fetch_images(build_config(config), ids)
    except (ConfigError, OSError, ValueError):
        return [None] * len(ids)
    return [views.thumbnail_uri(images.get(key)) for key in ids]
