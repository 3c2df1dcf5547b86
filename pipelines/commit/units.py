"""Work units, the run's identity, and which rows are already durable.

A unit is one row group of one input file. Output is staged as *pieces*: files named after
the unit and the contiguous range of its rows they hold (``u000012-r0000001024-n000064``),
so a listing alone says which rows are durable. A rerun after a crash reads only the rows
no piece covers, and a retried write task replaces its own piece instead of adding one.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ..config import JobConfig
from ..storage import locate

PIECE_RE = re.compile(r"u(\d{6})-r(\d{10})-n(\d{6})\.parquet$")

# Settings that change where or how fast a run goes, never its numbers: a rerun that only
# changes these still resumes or recognises its committed output.
NOT_IN_KEY = {
    "output", "overwrite", "run_id", "ray_address", "score_actors", "caption_actors",
    "score_gpus", "caption_gpus", "score_cpus", "caption_cpus", "score_batch_size",
    "caption_batch_size", "decode_batch_size", "report_category_column",
    # Reuse sources enter the key by the identity of their committed results (preflight), not their paths;
    # dedup changes which rows run a model, never a number.
    "reuse", "dedup",
    "output_format", "output_partition", "target_file_mb",
    # how many batches an actor holds, and padding that is dropped again: never a number
    "overlap", "shape_buckets",
}


@dataclass(frozen=True)
class Unit:
    index: int
    path: str
    row_group: int
    rows: int
    partition: dict = field(default_factory=dict)


class UnitError(ValueError):
    """An input file that cannot be read as part of this dataset (found before any model loads)."""


def _castable(file_type: pa.DataType, dataset_type: pa.DataType) -> bool:
    return file_type == dataset_type or pa.types.is_null(file_type)


# Footers are read concurrently: on S3 each is a request of tens of milliseconds, and a
# nightly partition can hold thousands of files.
FOOTER_READERS = 16


def _footer(fragment: pads.ParquetFileFragment) -> tuple[pa.Schema, object]:
    return fragment.physical_schema, fragment.metadata


def plan_units(dataset: pads.FileSystemDataset) -> list[Unit]:
    """One unit per non-empty row group, in file order; checks every file against the dataset schema."""
    units: list[Unit] = []
    schema = dataset.schema
    fragments = list(dataset.get_fragments())
    with ThreadPoolExecutor(max(1, min(FOOTER_READERS, len(fragments)))) as pool:
        footers = list(pool.map(_footer, fragments))  # in file order
    for fragment, (physical, metadata) in zip(fragments, footers):
        for file_field in physical:
            if file_field.name in schema.names and not _castable(file_field.type, schema.field(file_field.name).type):
                raise UnitError(
                    f"{fragment.path}: column {file_field.name!r} is {file_field.type}, "
                    f"but other files of the input have {schema.field(file_field.name).type}"
                )
        partition = pads.get_partition_keys(fragment.partition_expression) or {}
        for row_group in range(metadata.num_row_groups):
            rows = metadata.row_group(row_group).num_rows
            if rows:
                units.append(Unit(len(units), fragment.path, row_group, rows, dict(partition)))
    return units


def fingerprint(filesystem: pafs.FileSystem, files: list[str], directory: str | None = None) -> list[list]:
    """Path, size and modification time of every input file: a changed input is a different run.
    Under ``directory`` they come from one recursive listing (on S3 a request per 1,000 files,
    where asking file by file costs one request each); files the listing lacks are asked for."""
    listed = {}
    if directory is not None:
        listed = {i.path: i for i in filesystem.get_file_info(pafs.FileSelector(directory, recursive=True))}
    missing = [f for f in files if f not in listed]
    listed.update(zip(missing, filesystem.get_file_info(missing)))
    return [[f, listed[f].size, listed[f].mtime_ns or 0] for f in files]


def model_fingerprint(reference: str | None) -> list:
    """A local or s3:// checkpoint directory by its files' sizes and times (retrained weights are a
    different run); a hub id by its name."""
    if not reference:
        return [reference]
    try:
        location = locate(reference)
        if location.filesystem.get_file_info(location.path).type != pafs.FileType.Directory:
            return [reference]
        infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
    except (OSError, ValueError):
        return [reference]
    files = sorted([i.path[len(location.path):], i.size, i.mtime_ns or 0] for i in infos if i.type == pafs.FileType.File)
    return [reference, files]


def work_key(config: JobConfig, input_fingerprint: list[list]) -> str:
    """Identifies the result: the same input and the same scoring settings give the same key."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in NOT_IN_KEY}
    body = json.dumps({"input": input_fingerprint, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def piece_name(unit: int, first_row: int, rows: int) -> str:
    return f"u{unit:06d}-r{first_row:010d}-n{rows:06d}.parquet"


def parse_piece(name: str) -> tuple[int, int, int] | None:
    """(unit, first row, row count) from a piece or committed part name; None for other files."""
    match = PIECE_RE.search(name)
    return tuple(int(g) for g in match.groups()) if match else None


class OverlapError(RuntimeError):
    """Two pieces claim the same rows: committing would duplicate them."""


def covered_ranges(names: list[str]) -> dict[int, list[tuple[int, int]]]:
    """Row ranges [start, end) per unit, merged; raises if two pieces overlap."""
    by_unit: dict[int, list[tuple[int, int]]] = {}
    seen: set[tuple[int, int]] = set()
    for name in names:
        parsed = parse_piece(name)
        if parsed is None:
            continue
        unit, first, rows = parsed
        if (unit, first) in seen:  # the same piece staged and already moved into place
            continue
        seen.add((unit, first))
        by_unit.setdefault(unit, []).append((first, first + rows))
    merged: dict[int, list[tuple[int, int]]] = {}
    for unit, ranges in by_unit.items():
        ranges.sort()
        out: list[tuple[int, int]] = []
        for start, end in ranges:
            if out and start < out[-1][1]:
                raise OverlapError(f"unit {unit}: rows {start}..{end} are held by two pieces")
            if out and start == out[-1][1]:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        merged[unit] = out
    return merged


def missing_ranges(unit: Unit, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The rows of ``unit`` no piece holds yet."""
    gaps, position = [], 0
    for start, end in covered:
        if start > position:
            gaps.append((position, min(start, unit.rows)))
        position = max(position, end)
    if position < unit.rows:
        gaps.append((position, unit.rows))
    return gaps


def durable_rows(units: list[Unit], covered: dict[int, list[tuple[int, int]]]) -> int:
    return sum(end - start for unit in units for start, end in covered.get(unit.index, []))
