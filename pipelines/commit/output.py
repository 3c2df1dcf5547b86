"""The output directory: staging, resuming, committing, and what readers may rely on.

Layout of OUTPUT (a directory or an s3:// prefix):

- ``_staging-<key>/``: pieces of an unfinished run (``_attempt.json`` names its run id).
  ``<key>`` identifies the input files and the scoring settings, so rerunning the same
  command after a crash finds and resumes it.
- ``part-<run_id>-u......-r..........-n......parquet``: committed data.
- ``_manifest.json``: the committed result (files, row counts by status, schema, config,
  models), replaced in one write.
- ``_SUCCESS``: written after the manifest, naming its run. **Readers treat an output without it as absent**
  and read the files the manifest it names lists (``committed_files``). While an overwrite is
  between the two writes, ``_manifest-previous.json`` is the manifest ``_SUCCESS`` still names.

A commit checks that the pieces cover every input row exactly once, moves them into place,
writes the manifest, then ``_SUCCESS``, and only then deletes what the previous result had.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from blip_ops.s3 import retry_flush_failures

from ..storage import Location, locate
from .units import Unit, covered_ranges, missing_ranges, parse_piece

MANIFEST = "_manifest.json"
PREVIOUS_MANIFEST = "_manifest-previous.json"
SUCCESS = "_SUCCESS"
ATTEMPT = "_attempt.json"
STAGING_PREFIX = "_staging-"

# Crash injection for the exactly-once tests: with BLIP_MODERATE_CRASH_AT=<step> the process
# ends at once (os._exit: no cleanup, no finally) when the commit reaches that step. Steps:
# "staged" (pieces checked, none moved), "half_moved", then for Parquet "manifest_written"
# (no _SUCCESS yet) and "success_written" (before tidy), for Delta "delta_committed" (the
# commit is in the log, the run never learns it).
CRASH_ENV = "BLIP_MODERATE_CRASH_AT"
CRASH_EXIT = 86


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT)


class OutputError(ValueError):
    """The output location cannot take this run's result."""


class IncompleteError(RuntimeError):
    """The staged pieces do not cover every input row exactly once; nothing was committed."""


class AlreadyCommitted(RuntimeError):
    """A concurrent run of the same attempt committed it first; ``manifest`` is what it committed."""

    def __init__(self, manifest: dict):
        super().__init__(f"run {manifest.get('run_id')} was committed by a concurrent run")
        self.manifest = manifest


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


def refuse_foreign(entries, uri: str, ours) -> None:
    """An output location holding files this job did not write (``ours(name)`` false) is refused."""
    foreign = sorted(e.base_name for e in entries if not ours(e.base_name))
    if foreign:
        raise OutputError(
            f"output {uri} holds files this job did not write ({', '.join(foreign[:3])}); "
            "choose an empty or job-owned location"
        )


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
    """The committed manifest, or None when the output has no complete result. A Delta table
    (or one partition of it, ``TABLE/dt=D``) answers from its log (``delta.read_committed``)."""
    from . import delta  # delta imports this module

    table = delta.table_at(location)
    if table is not None:
        return delta.read_committed(table)
    return read_manifest(location)


def read_manifest(location: Location) -> dict | None:
    """The Parquet committer's answer: the manifest ``_SUCCESS`` names. Between a new
    ``_manifest.json`` and its ``_SUCCESS`` that is still the replaced result's, kept as
    ``_manifest-previous.json``: a reader of an output being overwritten sees the old result or
    the new one, never none."""
    success = _read_json(location, SUCCESS)
    if not success:
        return None
    for name in (MANIFEST, PREVIOUS_MANIFEST):
        manifest = _read_json(location, name)
        if manifest and success.get("run_id") == manifest.get("run_id"):
            return manifest
    return None


def committed_files(uri: str) -> list[str]:
    """Paths of the committed result's files (for pyarrow with the same filesystem); [] if none.
    For a Delta table: the files of its current version (of one partition for ``TABLE/dt=D``)."""
    from . import delta

    location = locate(uri)
    table = delta.table_at(location)
    if table is not None:
        return delta.committed_files(table)
    manifest = read_manifest(location)
    return [location.join(name) for name in manifest["files"]] if manifest else []


def prepare_output(uri: str, overwrite: bool, key: str) -> Location:
    """Refuse to mix results: a different committed result needs ``overwrite``; foreign files are never touched."""
    location = locate(uri)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {uri} is a file; it must be a directory or prefix")
    entries = _names(location)
    if any(e.base_name == "_delta_log" for e in entries):
        raise OutputError(f"output {uri} is a Delta table; pass --output-format delta to write to it")
    refuse_foreign(entries, uri, _is_ours)
    committed = read_manifest(location)
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


def attempt_committed(location: Location, committed: dict) -> bool:
    """Whether ``committed`` is the attempt still staged for its key: the run committed and was
    stopped before it tidied (a rerun with --overwrite then has nothing left to do)."""
    previous = _read_json(location, f"{STAGING_PREFIX}{committed.get('key')}/{ATTEMPT}")
    return bool(previous) and previous.get("run_id") == committed.get("run_id")


def _part_name(run_id: str, piece: str) -> str:
    return f"part-{run_id}-{piece}"


def _pieces(location: Location, attempt: Attempt) -> dict[str, str]:
    """Piece name -> where it is now: in staging, or already moved into place by an interrupted commit."""
    found = {}
    # Staging is listed first: a piece a concurrent commit moves between the two listings is
    # then seen in one of them (listing the other way round, it could be in neither).
    for info in _names(location, attempt.staging):
        if parse_piece(info.base_name):
            found[info.base_name] = info.path
    prefix = f"part-{attempt.run_id}-"
    for info in _names(location):
        if info.base_name.startswith(prefix) and parse_piece(info.base_name):
            found[info.base_name[len(prefix):]] = info.path
    return found


def staged_paths(location: Location, attempt: Attempt) -> list[str]:
    """Where this attempt's pieces are now (in staging, or moved into place by an interrupted commit)."""
    return sorted(_pieces(location, attempt).values())


def durable(location: Location, attempt: Attempt) -> dict[int, list[tuple[int, int]]]:
    """Row ranges per unit that an earlier, interrupted attempt already wrote."""
    return covered_ranges(list(_pieces(location, attempt)))


def _read_counted(fs: pafs.FileSystem, path: str, reasons: bool) -> tuple[pa.Table, int, bool]:
    """One piece's small columns: the table, its rows with evidence, whether it has flag reasons."""
    with fs.open_input_file(path) as source:
        parquet = pq.ParquetFile(source)
        # Pieces without flag_reasons (written by older code, or by tests) count no reasons.
        with_reasons = reasons and "flag_reasons" in parquet.schema_arrow.names
        table = parquet.read(columns=["status", "flagged"] + (["flag_reasons"] if with_reasons else []))
        explained = 0
        if "evidence" in parquet.schema_arrow.names:
            explained = table.num_rows - parquet.read(columns=["evidence.layer"]).column(0).null_count
    return table, explained, with_reasons


def _count(fs: pafs.FileSystem, paths: list[str], by_reason: Counter | None = None) -> tuple[int, dict[str, int], int, int]:
    """Rows by status, flagged rows and rows with evidence, reading small columns file by file
    (of the evidence struct only its ``layer``, set wherever evidence was computed); with
    ``by_reason``, also flagged rows by reason (a row flagged for two counts under both), in the same reads."""
    rows, flagged, evidence, by_status = 0, 0, 0, Counter()
    for path in paths:
        table, explained, with_reasons = retry_flush_failures(lambda: _read_counted(fs, path, by_reason is not None))
        evidence += explained
        rows += table.num_rows
        flagged += int(pa.compute.sum(table.column("flagged")).as_py() or 0)
        counts = pa.compute.value_counts(table.column("status").combine_chunks()) if table.num_rows else None
        if counts is not None:
            by_status.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        reasons = pa.compute.list_flatten(table.column("flag_reasons").combine_chunks()) if with_reasons and table.num_rows else None
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


@dataclass
class Checked:
    """Staged pieces that cover every input row exactly once, and what they hold."""

    pieces: dict[str, str]
    rows: int
    by_status: dict[str, int]
    flagged: int
    flagged_by_reason: dict[str, int] = field(default_factory=dict)
    evidence_rows: int = 0


LIST_TRIES = 3


def check_pieces(location: Location, attempt: Attempt, units: list[Unit]) -> Checked:
    """Every input row staged exactly once (else ``IncompleteError``), counted by status."""
    for tries in range(1, LIST_TRIES + 1):
        pieces = _pieces(location, attempt)
        _check_complete(pieces, units)
        try:
            by_reason = Counter()
            rows, by_status, flagged, evidence_rows = _count(location.filesystem, sorted(pieces.values()), by_reason)
            break
        except FileNotFoundError:
            # A concurrent commit of the same attempt moved a piece after it was listed: list again.
            if tries == LIST_TRIES:
                raise
    expected = sum(u.rows for u in units)
    if rows != expected:
        raise IncompleteError(f"row count mismatch: {expected} input rows, {rows} staged; nothing committed")
    return Checked(pieces, rows, by_status, flagged, dict(sorted(by_reason.items())), evidence_rows)


def move_pieces(location: Location, attempt: Attempt, checked: Checked, empty_schema: pa.Schema) -> list[str]:
    """Move the pieces to their final names beside the staging directory (a piece already moved
    by an interrupted commit stays); returns the names. Readers do not see them until the commit."""
    fs = location.filesystem
    final = []
    items = sorted(checked.pieces.items())
    for index, (piece, path) in enumerate(items):
        if index == len(items) // 2 and index:
            crash_point("half_moved")
        name = _part_name(attempt.run_id, piece)
        _move(fs, path, location.join(name))
        final.append(name)
    if not final:
        # Zero input rows still commit a readable, typed (empty) result.
        name = f"part-{attempt.run_id}-empty.parquet"
        pq.write_table(empty_schema.empty_table(), location.join(name), filesystem=fs)
        final.append(name)
    return final


def manifest_body(manifest: dict, attempt: Attempt, checked: Checked, files: list[str]) -> dict:
    """What a commit records (``_manifest.json``, or the Delta commit's metadata)."""
    return dict(
        manifest, run_id=attempt.run_id, key=attempt.key, files=files, rows=checked.rows,
        rows_by_status=checked.by_status, flagged=checked.flagged,
        committed_at=datetime.now(timezone.utc).isoformat(),
        flagged_by_reason=checked.flagged_by_reason,
        evidence=dict(manifest.get("evidence") or {}, rows=checked.evidence_rows),
    )


def commit(location: Location, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict) -> CommitResult:
    """Check that every input row is staged exactly once, move the pieces in, write the manifest, then ``_SUCCESS``."""
    checked = check_pieces(location, attempt, units)
    crash_point("staged")
    final = move_pieces(location, attempt, checked, empty_schema)
    body = manifest_body(manifest, attempt, checked, final)
    replaced = read_manifest(location)
    if replaced and replaced.get("run_id") != attempt.run_id:
        _write_json(location, PREVIOUS_MANIFEST, replaced)
    _write_json(location, MANIFEST, body)
    crash_point("manifest_written")
    _write_json(location, SUCCESS, {"run_id": attempt.run_id, "key": attempt.key, "committed_at": body["committed_at"]})
    crash_point("success_written")
    tidy(location, body)
    return CommitResult(final, checked.rows, checked.by_status, checked.flagged, body)


def tidy(location: Location, committed: dict) -> None:
    """After a commit: remove the replaced result's files and the committed attempt's staging."""
    fs = location.filesystem
    _delete_file(fs, location.join(PREVIOUS_MANIFEST))
    keep = set(committed["files"])
    for info in _names(location):
        if info.base_name.startswith("part-") and info.base_name not in keep:
            _delete_file(fs, info.path)
    _delete_dir(fs, staging_path(location, committed["key"]))


class ParquetCommitter:
    """The directory of Parquet files with ``_manifest.json`` and ``_SUCCESS`` (the default format)."""

    name = "parquet"

    def prepare(self, uri: str, overwrite: bool, key: str) -> Location:
        return prepare_output(uri, overwrite, key)

    def read_committed(self, location: Location) -> dict | None:
        return read_manifest(location)

    def commit(self, location: Location, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict) -> CommitResult:
        return commit(location, attempt, units, empty_schema, manifest)

    def tidy(self, location: Location, committed: dict) -> None:
        tidy(location, committed)
