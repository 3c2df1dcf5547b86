"""Reading units and writing pieces: the two ends of the pipeline, as plain batch functions.

Rows carry their unit and their index within it (``__unit``, ``__row``) from the read to
the write, so every written piece can be named after exactly the rows it holds.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..schema import EVIDENCE_SECONDS
from .units import piece_name

UNIT = "__unit"
ROW = "__row"


def unit_items(units, todo: dict[int, list[tuple[int, int]]]) -> list[dict]:
    """Rows for ``ray.data.from_items``: each unit still to do and the row ranges it needs."""
    return [
        {
            "unit": u.index,
            "path": u.path,
            "row_group": u.row_group,
            "partition": json.dumps(u.partition, default=str),
            "ranges": json.dumps(todo[u.index]),
        }
        for u in units
        if todo.get(u.index)
    ]


def _wanted(first: int, count: int, ranges: list[list[int]]) -> np.ndarray:
    index = np.arange(first, first + count)
    mask = np.zeros(count, dtype=bool)
    for start, end in ranges:
        mask |= (index >= start) & (index < end)
    return mask


def _conform(batch: pa.RecordBatch, schema: pa.Schema, partition: dict) -> pa.Table:
    """The file's columns plus its hive partition values, in the dataset's schema."""
    table = pa.Table.from_batches([batch])
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.name in partition:
            columns.append(pa.array([partition[field.name]] * table.num_rows).cast(field.type))
        else:  # a column other files have: null here, as a dataset read would give
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def read_units(items: pa.Table, *, filesystem: pafs.FileSystem, schema: pa.Schema, batch_rows: int):
    """Stream each unit's wanted rows in batches of at most ``batch_rows``."""
    for item in items.to_pylist():
        ranges = json.loads(item["ranges"])
        partition = json.loads(item["partition"])
        with filesystem.open_input_file(item["path"]) as source:
            parquet = pq.ParquetFile(source)
            columns = [name for name in schema.names if name in parquet.schema_arrow.names]
            first = 0
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[item["row_group"]], columns=columns):
                count = batch.num_rows
                mask = _wanted(first, count, ranges)
                if mask.any():
                    table = _conform(batch, schema, partition)
                    table = table.append_column(UNIT, pa.array(np.full(count, item["unit"], dtype=np.int64)))
                    table = table.append_column(ROW, pa.array(np.arange(first, first + count, dtype=np.int64)))
                    yield table.filter(pa.array(mask))
                first += count


def _runs(units: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) positions of maximal runs of consecutive rows of one unit."""
    if len(units) == 0:
        return []
    breaks = np.flatnonzero((np.diff(units) != 0) | (np.diff(rows) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(units)]])
    return list(zip(starts.tolist(), ends.tolist()))


def _write_atomically(table: pa.Table, filesystem: pafs.FileSystem, directory: str, name: str) -> None:
    final = f"{directory}/{name}"
    if isinstance(filesystem, pafs.LocalFileSystem):
        # A killed writer must never leave a half file under a piece name.
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, filesystem=filesystem)
        filesystem.move(temporary, final)
    else:
        # An object store publishes an upload only when it completes.
        pq.write_table(table, final, filesystem=filesystem)


def write_pieces(batch: pa.Table, *, filesystem: pafs.FileSystem, staging: str, schema: pa.Schema) -> pa.Table:
    """Write each run of consecutive rows as a piece named after them; returns one row per piece,
    with the seconds the rows' evidence took (``EVIDENCE_SECONDS``, a working column never written)."""
    units = batch.column(UNIT).to_numpy()
    rows = batch.column(ROW).to_numpy()
    seconds = batch.column(EVIDENCE_SECONDS).to_numpy() if EVIDENCE_SECONDS in batch.column_names else np.zeros(len(rows))
    data = batch.drop_columns([c for c in (UNIT, ROW, EVIDENCE_SECONDS) if c in batch.column_names]).cast(schema)
    names, counts, spent = [], [], []
    for start, end in _runs(units, rows):
        name = piece_name(int(units[start]), int(rows[start]), end - start)
        _write_atomically(data.slice(start, end - start), filesystem, staging, name)
        names.append(name)
        counts.append(end - start)
        spent.append(float(seconds[start:end].sum()))
    return pa.table({
        "piece": pa.array(names, pa.string()),
        "rows": pa.array(counts, pa.int64()),
        "evidence_s": pa.array(spent, pa.float64()),
    })
