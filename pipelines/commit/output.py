"""The output directory: staging, resuming, committing, and what readers may rely on.

Layout of OUTPUT (a directory or an s3:// prefix):

- ``_staging-<key>/``: pieces of an unfinished run (``_attempt.json`` names its run id).
  ``<key>`` identifies the input files and the scoring settings, so rerunning the same
  command after a crash finds and resumes it.
- ``part-<run_id>-u......-r..........-n......parquet``: committed data.
- ``_manifest.json``: the committed result (files, row counts by status, schema, config,
  models), replaced in one write.
- ``_SUCCESS``: written after the manifest. **Readers treat an output without it as absent**
  and read the files the manifest lists (``committed_files``).

A commit checks that the pieces cover every input row exactly once, moves them into place,
writes the manifest, then ``_SUCCESS``, and only then deletes what the previous result had.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..storage import Location, locate
from .units import Unit, covered_ranges, missing_ranges, parse_piece

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
ATTEMPT = "_attempt.json"
STAGING_PREFIX = "_staging-"


class OutputError(ValueError):
    """The output location cannot take this run's result."""


class IncompleteError(RuntimeError):
    """The staged pieces do not cover every input row exactly once; nothing was committed."""


@dataclass
class Attempt:
    run_id: str
    key: str
    staging: str
    resumed: bool


@dataclass
class CommitResult:
    files: list[str]
    rows: int
    by_status: dict[str, int]
    flagged: int
    manifest: dict = field(default_factory=dict)


def _names(location: Location, path: str | None = None) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path or location.path, allow_not_found=True, recursive=False)
    return location.filesystem.get_file_info(selector)


def _is_ours(name: str) -> bool:
    """Names this job writes; anything else in the output belongs to someone else."""
    return name.startswith("_") or name.startswith("part-")


def _read_json(location: Location, name: str) -> dict | None:
    try:
        with location.filesystem.open_input_stream(location.join(name)) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, ValueError):
        return None
    except OSError as exc:  # some stores report a missing object as a generic error
        if "not found" in str(exc).lower() or "no such" in str(exc).lower():
            return None
        raise


def _write_json(location: Location, name: str, body: dict) -> None:
    data = json.dumps(body, indent=2, sort_keys=True, default=str).encode()
    fs = location.filesystem
    if isinstance(fs, pafs.LocalFileSystem):
        # Replace in one rename, so a reader never sees half a manifest.
        directory, _, base = name.rpartition("/")
        temporary = location.join(*([directory] if directory else []), f".{base}.tmp")
        with fs.open_output_stream(temporary) as stream:
            stream.write(data)
        fs.move(temporary, location.join(name))
    else:
        with fs.open_output_stream(location.join(name)) as stream:
            stream.write(data)


def read_committed(location: Location) -> dict | None:
    """The committed manifest, or None when the output has no complete result."""
    success = _read_json(location, SUCCESS)
    manifest = _read_json(location, MANIFEST)
    if not success or not manifest or success.get("run_id") != manifest.get("run_id"):
        return None
    return manifest


def committed_files(uri: str) -> list[str]:
    """Paths of the committed result's files (for pyarrow with the same filesystem); [] if none."""
    location = locate(uri)
    manifest = read_committed(location)
    return [location.join(name) for name in manifest["files"]] if manifest else []


def prepare_output(uri: str, overwrite: bool, key: str) -> Location:
    """Refuse to mix results: a different committed result needs ``overwrite``; foreign files are never touched."""
    location = locate(uri)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {uri} is a file; it must be a directory or prefix")
    entries = _names(location)
    foreign = sorted(e.base_name for e in entries if not _is_ours(e.base_name))
    if foreign:
        raise OutputError(
            f"output {uri} holds files this job did not write ({', '.join(foreign[:3])}); "
            "choose an empty or job-owned location"
        )
    committed = read_committed(location)
    if committed and committed.get("key") != key and not overwrite:
        raise OutputError(
            f"output {uri} holds a result of another input or configuration (run {committed.get('run_id')}); "
            "pass --overwrite to replace it"
        )
    location.filesystem.create_dir(location.path, recursive=True)
    return location


def staging_path(location: Location, key: str) -> str:
    return location.join(f"{STAGING_PREFIX}{key}")


def open_attempt(location: Location, key: str, run_id: str, committed: dict | None) -> Attempt:
    """Resume the unfinished attempt for ``key`` if there is one, else start a new one."""
    staging = staging_path(location, key)
    fs = location.filesystem
    previous = _read_json(location, f"{STAGING_PREFIX}{key}/{ATTEMPT}")
    if previous and not (committed and committed.get("run_id") == previous.get("run_id")):
        return Attempt(previous["run_id"], key, staging, resumed=True)
    if previous:  # leftovers of the attempt that was committed
        _delete_dir(fs, staging)
    fs.create_dir(staging, recursive=True)
    body = {"run_id": run_id, "key": key, "started_at": datetime.now(timezone.utc).isoformat()}
    _write_json(location, f"{STAGING_PREFIX}{key}/{ATTEMPT}", body)
    return Attempt(run_id, key, staging, resumed=False)


def _part_name(run_id: str, piece: str) -> str:
    return f"part-{run_id}-{piece}"


def _pieces(location: Location, attempt: Attempt) -> dict[str, str]:
    """Piece name -> where it is now: in staging, or already moved into place by an interrupted commit."""
    found = {}
    prefix = f"part-{attempt.run_id}-"
    for info in _names(location):
        if info.base_name.startswith(prefix) and parse_piece(info.base_name):
            found[info.base_name[len(prefix):]] = info.path
    for info in _names(location, attempt.staging):
        if parse_piece(info.base_name):
            found.setdefault(info.base_name, info.path)
    return found


def staged_paths(location: Location, attempt: Attempt) -> list[str]:
    """Where this attempt's pieces are now (in staging, or moved into place by an interrupted commit)."""
    return sorted(_pieces(location, attempt).values())


def durable(location: Location, attempt: Attempt) -> dict[int, list[tuple[int, int]]]:
    """Row ranges per unit that an earlier, interrupted attempt already wrote."""
    return covered_ranges(list(_pieces(location, attempt)))


def _count(fs: pafs.FileSystem, paths: list[str], by_reason: Counter | None = None) -> tuple[int, dict[str, int], int, int]:
    """Rows by status, flagged rows and rows with evidence, reading small columns file by file
    (of the evidence struct only its ``layer``, set wherever evidence was computed); with
    ``by_reason``, also flagged rows by reason (a row flagged for two counts under both), in the same reads."""
    rows, flagged, evidence, by_status = 0, 0, 0, Counter()
    columns = ["status", "flagged"] + (["flag_reasons"] if by_reason is not None else [])
    for path in paths:
        with fs.open_input_file(path) as source:
            parquet = pq.ParquetFile(source)
            table = parquet.read(columns=columns)
            if "evidence" in parquet.schema_arrow.names:
                evidence += table.num_rows - parquet.read(columns=["evidence.layer"]).column(0).null_count
        rows += table.num_rows
        flagged += int(pa.compute.sum(table.column("flagged")).as_py() or 0)
        counts = pa.compute.value_counts(table.column("status").combine_chunks()) if table.num_rows else None
        if counts is not None:
            by_status.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        reasons = pa.compute.list_flatten(table.column("flag_reasons").combine_chunks()) if by_reason is not None and table.num_rows else None
        if reasons is not None and len(reasons):
            counts = pa.compute.value_counts(reasons)
            by_reason.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
    return rows, dict(sorted(by_status.items())), flagged, evidence


def _check_complete(pieces: dict[str, str], units: list[Unit]) -> None:
    covered = covered_ranges(list(pieces))
    known = {u.index for u in units}
    stray = sorted(set(covered) - known)
    if stray:
        raise IncompleteError(f"staged pieces belong to units {stray[:5]} that this input does not have")
    gaps = [(u.index, missing_ranges(u, covered.get(u.index, []))) for u in units]
    gaps = [(index, ranges) for index, ranges in gaps if ranges]
    if gaps:
        missing = sum(end - start for _, ranges in gaps for start, end in ranges)
        raise IncompleteError(f"{missing} input rows have no output yet (first: unit {gaps[0][0]} rows {gaps[0][1][0]})")


def _move(fs: pafs.FileSystem, source: str, target: str) -> None:
    if source == target:
        return
    try:
        fs.move(source, target)
    except (FileNotFoundError, OSError):
        # A concurrent commit of the same attempt may have moved it first.
        if fs.get_file_info(target).type != pafs.FileType.File:
            raise


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def _delete_file(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def commit(location: Location, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict) -> CommitResult:
    """Check that every input row is staged exactly once, move the pieces in, write the manifest, then ``_SUCCESS``."""
    fs = location.filesystem
    pieces = _pieces(location, attempt)
    _check_complete(pieces, units)
    expected = sum(u.rows for u in units)
    by_reason = Counter() if "flag_reasons" in empty_schema.names else None
    rows, by_status, flagged, evidence_rows = _count(fs, sorted(pieces.values()), by_reason)
    if rows != expected:
        raise IncompleteError(f"row count mismatch: {expected} input rows, {rows} staged; nothing committed")

    final = []
    for piece, path in sorted(pieces.items()):
        name = _part_name(attempt.run_id, piece)
        _move(fs, path, location.join(name))
        final.append(name)
    if not final:
        # Zero input rows still commit a readable, typed (empty) result.
        name = f"part-{attempt.run_id}-empty.parquet"
        pq.write_table(empty_schema.empty_table(), location.join(name), filesystem=fs)
        final.append(name)

    committed_at = datetime.now(timezone.utc).isoformat()
    body = dict(
        manifest, run_id=attempt.run_id, key=attempt.key, files=final, rows=rows,
        rows_by_status=by_status, flagged=flagged, committed_at=committed_at,
        flagged_by_reason=dict(sorted((by_reason or {}).items())),
        evidence=dict(manifest.get("evidence") or {}, rows=evidence_rows),
    )
    _write_json(location, MANIFEST, body)
    _write_json(location, SUCCESS, {"run_id": attempt.run_id, "key": attempt.key, "committed_at": committed_at})
    tidy(location, body)
    return CommitResult(final, rows, by_status, flagged, body)


def tidy(location: Location, committed: dict) -> None:
    """After a commit: remove the replaced result's files and the committed attempt's staging."""
    fs = location.filesystem
    keep = set(committed["files"])
    for info in _names(location):
        if info.base_name.startswith("part-") and info.base_name not in keep:
            _delete_file(fs, info.path)
    _delete_dir(fs, staging_path(location, committed["key"]))
