"""The commit's merge: staged pieces become output files of a useful size, in row order.

Pieces stay as small as resuming needs (one per model batch, 64 rows at the CPU defaults). Moved in
as they were, a 100,000-row run committed 1,568 files of about 24 KB, and a dashboard's DuckDB
``count(*)`` over them took 0.290 s against 0.004 s for the same rows in one file (issue 29,
BENCHMARKS.md). So the commit streams consecutive pieces into files of about ``target_file_mb``
(128 by default), in row groups of at most ``ROW_GROUP_BYTES`` or ``ROW_GROUP_ROWS``.

- **Which pieces go together** is decided from the listing alone (names and sizes, ``plan``; a
  file takes ``STAGED_PER_MERGED`` times the target in staged bytes, as pieces compress worse): the
  same staged pieces always give the same files, so a rerun or a resumed commit writes the same
  names, and a file already complete (a footer with the planned row count) is kept, never written
  twice.
- **A file's name is the row range it holds**: ``part-<run_id>-u000003-r0000000000-to-u000007-r0000000064.parquet``
  holds every row from unit 3 row 0 up to (not including) unit 7 row 64, in that order (input order).
- **One task writes one file** (``merge_file``), streaming piece after piece through a
  ``ParquetWriter``: it holds at most one row group in memory, never the file. Tasks run wherever
  the caller's ``run_tasks`` sends them (the job: Ray tasks, ``pipelines.dataflow.runtime.map_tasks``;
  this module never imports Ray).
- **Nothing half written is ever under a final name**: a file is written under a temporary name in
  the staging directory, then moved (a rename on local disk; on an object store a copy, which the
  store publishes whole, then the delete). A killed writer leaves only that temporary, which tidy
  removes with the staging directory.
- **Counts come from the data the merge streams anyway**: rows by status, flagged rows by reason,
  rows with evidence, so the driver reads no piece at all.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from blip_ops.s3 import retry_flush_failures

from ..storage import locate
from .units import parse_piece

DEFAULT_TARGET_FILE_MB = 128.0
MB = 1024 * 1024
# Row groups: about 128 MB of Arrow data or 1,000,000 rows, whichever comes first (issue 29). A
# row group is the unit a reader skips by its statistics and the most a merge task holds.
ROW_GROUP_BYTES = 128 * MB
ROW_GROUP_ROWS = 1_000_000
# Staged bytes per byte of merged file: pieces of 64-row row groups compress worse than the merged
# file's long ones (measured 1.79 at 100,000 rows and 1.81 at 1,000,000, BENCHMARKS.md), so a
# file takes about this many times the target in staged pieces to come out near the target.
STAGED_PER_MERGED = 1.8
# Rows read from a piece at a time (pieces from the keyed plan's assemble pass can be large).
READ_ROWS = 65_536
# A killed task is retried this often (a worker lost to a node or to memory); crash injection
# (output.CRASH_ENV) sets it to 0, so that a run stops where it was killed, as a killed job does.
TASK_RETRIES = 2


@dataclass
class Merger:
    """How the commit merges: the target file size, and where its tasks run.

    ``run_tasks(fn, items)`` yields ``fn(item)`` for every item, in any order; the default runs them
    one after another in this process (the committer's own tests). The job passes Ray tasks."""

    target_file_mb: float = DEFAULT_TARGET_FILE_MB
    run_tasks: Callable[[Callable, list], Iterable] | None = None

    @property
    def target_bytes(self) -> int:
        return max(1, int(self.target_file_mb * MB))

    @property
    def staged_budget(self) -> int:
        """Staged bytes a file takes (``plan``'s budget) to come out at about the target."""
        return max(1, int(self.target_bytes * STAGED_PER_MERGED))

    def run(self, fn: Callable, items: list) -> Iterator:
        if self.run_tasks is None:
            return (fn(item) for item in items)
        return iter(self.run_tasks(fn, items))


@dataclass
class Tally:
    """What a file holds, as the manifest counts it."""

    rows: int = 0
    flagged: int = 0
    evidence_rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        names = batch.schema.names
        self.rows += batch.num_rows
        if not batch.num_rows:
            return
        if "flagged" in names:
            self.flagged += int(pc.sum(batch.column("flagged")).as_py() or 0)
        if "status" in names:
            self.by_status.update(_value_counts(batch.column("status")))
        if "flag_reasons" in names:
            self.by_reason.update(_value_counts(pc.list_flatten(batch.column("flag_reasons"))))
        if "evidence" in names and pa.types.is_struct(batch.schema.field("evidence").type):
            # Evidence was computed where the struct and its layer are set (pc.struct_field carries the struct's nulls).
            self.evidence_rows += batch.num_rows - pc.struct_field(batch.column("evidence"), "layer").null_count

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "flagged": self.flagged, "evidence_rows": self.evidence_rows,
            "by_status": dict(self.by_status), "by_reason": dict(self.by_reason),
        }


def _value_counts(column) -> dict:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not len(column):
        return {}
    counts = pc.value_counts(column)
    return {v: c for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()) if v is not None}


def merged_name(run_id: str, first: tuple[int, int], end: tuple[int, int]) -> str:
    """The file of every row from (unit, row) ``first`` up to, not including, (unit, row) ``end``."""
    return f"part-{run_id}-u{first[0]:06d}-r{first[1]:010d}-to-u{end[0]:06d}-r{end[1]:010d}.parquet"


@dataclass(frozen=True)
class Piece:
    name: str  # u000001-r0000000064-n000064.parquet
    path: str
    size: int


def plan(run_id: str, pieces: list[Piece], budget: int) -> list[dict]:
    """Consecutive pieces (in row order) grouped into files of at most ``budget`` staged bytes each
    (``Merger.staged_budget``), and always at least one piece. Decided from the listing alone, so
    the same pieces always make the same files."""
    ordered = sorted(pieces, key=lambda p: parse_piece(p.name)[:2])
    groups: list[list[Piece]] = []
    size = 0
    for piece in ordered:
        if groups and size + piece.size <= budget:
            groups[-1].append(piece)
            size += piece.size
        else:
            groups.append([piece])
            size = piece.size
    files = []
    for group in groups:
        first_unit, first_row, _ = parse_piece(group[0].name)
        last_unit, last_row, last_rows = parse_piece(group[-1].name)
        files.append({
            "name": merged_name(run_id, (first_unit, first_row), (last_unit, last_row + last_rows)),
            "pieces": [p.path for p in group],
            "rows": sum(parse_piece(p.name)[2] for p in group),
        })
    return files


def _complete(fs: pafs.FileSystem, path: str, rows: int) -> bool:
    """Whether ``path`` is a whole merged file of ``rows`` rows (a footer that says so)."""
    try:
        with fs.open_input_file(path) as source:
            return pq.ParquetFile(source).metadata.num_rows == rows
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return False


def _tally_file(fs: pafs.FileSystem, path: str) -> Tally:
    """Counts of a merged file written by an earlier, interrupted commit (small columns only)."""
    tally = Tally()
    with fs.open_input_file(path) as source:
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        columns = [c for c in ("status", "flagged", "flag_reasons") if c in names]
        for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=columns + (["evidence.layer"] if "evidence" in names else [])):
            tally.add(batch)
    return tally


class _RowGroups:
    """Batches gathered into row groups of at most ``ROW_GROUP_BYTES`` / ``ROW_GROUP_ROWS``."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema):
        self.writer, self.schema = writer, schema
        self.batches: list[pa.RecordBatch] = []
        self.rows = self.bytes = 0

    def add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            room = ROW_GROUP_ROWS - self.rows
            if self.bytes and batch.nbytes and self.bytes + batch.nbytes > ROW_GROUP_BYTES:
                self.flush()
                continue
            take = batch.slice(0, room)
            self.batches.append(take)
            self.rows += take.num_rows
            self.bytes += take.nbytes
            batch = batch.slice(take.num_rows)
            if self.rows >= ROW_GROUP_ROWS or self.bytes >= ROW_GROUP_BYTES:
                self.flush()

    def flush(self) -> None:
        if self.rows:
            table = pa.Table.from_batches(self.batches, schema=self.schema)
            self.writer.write_table(table, row_group_size=table.num_rows)
        self.batches, self.rows, self.bytes = [], 0, 0


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema):
        return batch
    return pa.RecordBatch.from_arrays([batch.column(name).cast(f.type) for name, f in zip(schema.names, schema)], schema=schema)


def _write(fs: pafs.FileSystem, pieces: list[str], temporary: str, tally: Tally) -> None:
    """Stream ``pieces``, in order, into one Parquet file at ``temporary``."""
    from .output import crash_point

    writer = None
    with fs.open_output_stream(temporary) as sink:
        try:
            for index, path in enumerate(pieces):
                with fs.open_input_file(path) as source:
                    parquet = pq.ParquetFile(source)
                    if writer is None:
                        schema = parquet.schema_arrow  # with its metadata (blip_moderate_schema_version)
                        writer = pq.ParquetWriter(sink, schema)
                        groups = _RowGroups(writer, schema)
                    for batch in parquet.iter_batches(batch_size=READ_ROWS):
                        batch = _conform(batch, schema)
                        tally.add(batch)
                        groups.add(batch)
                if index == 0:
                    crash_point("merge_writing")  # partway through a file: its first piece read, no footer yet
            groups.flush()
        finally:
            if writer is not None:
                writer.close()  # on a failure too (the temporary is then deleted): no writer left to close at exit


def merge_file(task: dict) -> dict:
    """Write one merged file (``plan``'s item plus ``output``, ``staging``); returns its name, size,
    time and counts. A file an interrupted commit already completed is counted, not rewritten."""
    from .output import move

    location = locate(task["output"])
    fs = location.filesystem
    final = location.join(task["name"])
    if _complete(fs, final, task["rows"]):
        tally = retry_flush_failures(lambda: _tally_file(fs, final))
    else:
        def write() -> tuple[Tally, str]:
            tally, temporary = Tally(), f"{task['staging']}/.merge-{uuid.uuid4().hex}.tmp"
            try:
                _write(fs, task["pieces"], temporary, tally)
            except BaseException:
                _delete(fs, temporary)
                raise
            return tally, temporary

        tally, temporary = retry_flush_failures(write)  # a whole write from the start each time
        move(fs, temporary, final)
    info = fs.get_file_info(final)
    return dict(tally.as_dict(), name=task["name"], size=info.size, mtime_ms=(info.mtime_ns or 0) // 1_000_000)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
