"""Embedding columns (``--embeddings``): the scorer's normalised ITC projections as Arrow values.

The output type is a true ``fixed_size_list<float16>[D]`` built explicitly: Ray Data turns numpy
columns into its own tensor extension type, which DuckDB, Lance and Polars do not read (FIELD_NOTES,
"Embeddings"). float16 halves the bytes of float32 (512 bytes a row at BLIP-base's D = 256) and
moves a dot product of two unit vectors by at most about D * 2^-11 * 2, far below any threshold's
meaning; ``itc_score`` stays the float32 product the scorer computed. Inside the keyed plan a row's
vector travels as its raw float16 bytes (``schema.IMAGE_EMBEDDING_BYTES``), so the plan's value files
keep one schema whatever D is.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from . import schema as S


def fixed_array(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """``(n, D)`` floats as ``fixed_size_list<float16>[D]``; null where ``valid`` is False."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float16)
    n, dim = matrix.shape
    values = pa.array(matrix.reshape(-1), pa.float16())
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    array = pa.FixedSizeListArray.from_arrays(values, dim, mask=mask) if mask is not None else pa.FixedSizeListArray.from_arrays(values, dim)
    return array


def spread(matrix: np.ndarray, rows: np.ndarray, n: int, dim: int) -> pa.Array:
    """``matrix``'s rows placed at ``rows`` of an ``n``-row column, null elsewhere."""
    full = np.zeros((n, dim), dtype=np.float16)
    valid = np.zeros(n, dtype=bool)
    if len(rows):
        full[rows] = matrix
        valid[rows] = True
    return fixed_array(full, valid)


def to_numpy(column, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size list column (or chunked) as ``(n, D)`` float16 and a validity mask (zeros where null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = dim or column.type.list_size
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if not len(column):
        return np.zeros((0, dim), dtype=np.float16), valid
    filled = column.fill_null(pa.scalar([0.0] * dim, column.type)) if column.null_count else column
    values = filled.flatten().to_numpy(zero_copy_only=False).astype(np.float16, copy=False)  # float32 (Delta) rounds back exactly
    return values.reshape(len(column), dim), valid


def to_bytes(column) -> pa.Array:
    """A fixed-size list column as raw float16 bytes per row (the keyed plan's form); null stays null."""
    matrix, valid = to_numpy(column)
    return pa.array([m.tobytes() if v else None for m, v in zip(matrix, valid)], pa.binary())


def from_bytes(column, dim: int) -> pa.Array:
    """Raw float16 bytes per row (``to_bytes``) back to ``fixed_size_list<float16>[dim]``."""
    values = column.to_pylist()
    valid = np.array([v is not None for v in values], dtype=bool)
    matrix = np.zeros((len(values), dim), dtype=np.float16)
    for row, value in enumerate(values):
        if value is not None:
            if len(value) != 2 * dim:
                raise ValueError(f"an embedding of {len(value) // 2} values where {dim} were expected")
            matrix[row] = np.frombuffer(value, dtype=np.float16)
    return fixed_array(matrix, valid)


@functools.lru_cache(maxsize=8)
def embedding_dim(itm_model: str) -> int:
    """D of a BLIP ITM checkpoint: its ``image_text_hidden_size`` (read from config.json, as preflight
    already does on the driver; no weights load)."""
    from blip_ops.checkpoints import ITM, inspect_checkpoint

    config = inspect_checkpoint(itm_model, ITM)
    return int(config.get("image_text_hidden_size", 256))


def extra_fields(config) -> list[pa.Field]:
    """The optional output columns ``config`` asks for (``schema.extra_fields``)."""
    embeddings = getattr(config, "embeddings", "none")
    dim = embedding_dim(config.itm_model) if embeddings != "none" else None
    # Delta's protocol has no half float: a Delta output stores the same values widened to float32.
    element = pa.float32() if getattr(config, "output_format", "parquet") == "delta" else pa.float16()
    return S.extra_fields(embeddings, dim, bool(getattr(config, "near_duplicates", False)), element)


def wanted_columns(embeddings: str) -> list[str]:
    """The embedding columns a run asking for ``embeddings`` writes."""
    return {"none": [], "image": [S.IMAGE_EMBEDDING], "both": [S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING]}[embeddings]
