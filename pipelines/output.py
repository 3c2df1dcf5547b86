"""Writing the scored dataset: staged under the output, then committed with a manifest.

Ray writes into ``OUTPUT/_staging-<run_id>/`` (readers skip names starting with ``_``).
Only a complete, counted result is moved into place as ``part-<run_id>-NNNNN.parquet``
and described by ``_manifest.json``; an overwritten result's files are removed last.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .storage import Location, locate

MANIFEST = "_manifest.json"


class OutputError(ValueError):
    """The output location cannot take this run's result."""


@dataclass
class CommitResult:
    files: list[str]
    rows: int
    by_status: dict[str, int]
    flagged: int
    manifest: dict = field(default_factory=dict)


def _entries(location: Location) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(location.path, allow_not_found=True, recursive=False)
    return location.filesystem.get_file_info(selector)


def prepare_output(uri: str, overwrite: bool) -> Location:
    """Refuse to mix results: an output that already holds data needs ``overwrite``."""
    location = locate(uri)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {uri} is a file; it must be a directory or prefix")
    existing = [e for e in _entries(location) if not e.base_name.startswith("_staging-")]
    if existing and not overwrite:
        raise OutputError(f"output {uri} is not empty; pass --overwrite to replace its result")
    if existing and _read_manifest(location) is None:
        # Never delete what this job did not write, whatever the flags say.
        raise OutputError(f"output {uri} holds files that are not a result of this job; refusing to overwrite")
    location.filesystem.create_dir(location.path, recursive=True)
    return location


def staging_path(location: Location, run_id: str) -> str:
    return location.join(f"_staging-{run_id}")


def _read_manifest(location: Location) -> dict | None:
    try:
        with location.filesystem.open_input_stream(location.join(MANIFEST)) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, ValueError):
        return None


def _write_json(location: Location, name: str, body: dict) -> None:
    with location.filesystem.open_output_stream(location.join(name)) as stream:
        stream.write(json.dumps(body, indent=2, sort_keys=True, default=str).encode())


def _staged_files(location: Location, staging: str) -> list[str]:
    selector = pafs.FileSelector(staging, allow_not_found=True, recursive=True)
    infos = location.filesystem.get_file_info(selector)
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _count(location: Location, files: list[str]) -> tuple[int, dict[str, int], int]:
    """Row counts by status, streamed batch by batch so a huge output needs no driver memory."""
    dataset = pads.dataset(files, filesystem=location.filesystem, format="parquet")
    rows, flagged, by_status = 0, 0, Counter()
    for batch in dataset.to_batches(columns=["status", "flagged"]):
        rows += batch.num_rows
        flagged += int(pa.compute.sum(batch.column("flagged")).as_py() or 0)
        counts = pa.compute.value_counts(batch.column("status"))
        by_status.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
    return rows, dict(sorted(by_status.items())), flagged


def commit(
    location: Location, run_id: str, expected_rows: int, empty_schema: pa.Schema, manifest: dict
) -> CommitResult:
    """Move staged files into place and write the manifest, after checking every input row is there."""
    fs = location.filesystem
    staging = staging_path(location, run_id)
    staged = _staged_files(location, staging)
    if not staged:
        # Zero input rows still commit a readable, typed (empty) result.
        fs.create_dir(staging, recursive=True)
        empty = f"{staging}/empty.parquet"
        pq.write_table(empty_schema.empty_table(), empty, filesystem=fs)
        staged = [empty]
    rows, by_status, flagged = _count(location, staged)
    if rows != expected_rows:
        raise RuntimeError(f"row count mismatch: read {expected_rows} input rows but staged {rows}; nothing committed")

    previous = _read_manifest(location)
    final = []
    for index, path in enumerate(staged):
        name = f"part-{run_id}-{index:05d}.parquet"
        fs.move(path, location.join(name))
        final.append(name)
    body = dict(manifest, files=final, rows=rows, rows_by_status=by_status, flagged=flagged)
    _write_json(location, MANIFEST, body)
    fs.delete_dir(staging)
    if previous:
        for name in previous.get("files", []):
            if name not in final:
                try:
                    fs.delete_file(location.join(name))
                except FileNotFoundError:
                    pass
    return CommitResult(final, rows, by_status, flagged, body)


def discard_staging(location: Location, run_id: str) -> None:
    try:
        location.filesystem.delete_dir(staging_path(location, run_id))
    except (FileNotFoundError, OSError):
        pass
