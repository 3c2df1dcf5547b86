"""The output directory: staging, resuming, committing, and what readers may rely on.

Layout of OUTPUT (a directory or an s3:// prefix):

- ``_staging-<key>/``: pieces of an unfinished run (``_attempt.json`` names its run id).
  ``<key>`` identifies the input files and the scoring settings, so rerunning the same
  command after a crash finds and resumes it.
- ``part-<run_id>-u......-r..........-to-u......-r...........parquet``: committed data, each file
  the rows of a range of (unit, row) positions in input order, about ``--target-file-mb`` each
  (``merge.py``: the staged pieces merged at commit).
- ``_manifest.json``: the committed result (files, row counts by status, schema, config,
  models), replaced in one write.
- ``_SUCCESS``: written after the manifest, naming its run. **Readers treat an output without it as absent**
  and read the files the manifest it names lists (``reader.committed_files``). While an overwrite is
  between the two writes, ``_manifest-previous.json`` is the manifest ``_SUCCESS`` still names.

A commit checks that the pieces cover every input row exactly once, merges them into files beside
the staging directory (invisible to readers: no manifest names them yet), writes the manifest, then
``_SUCCESS``, and only then deletes what the previous result had and the staging directory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..storage import Location, locate
from .merge import Merger, Piece, Tally, merge_file, plan
from .units import Unit, covered_ranges, missing_ranges, parse_piece

MANIFEST = "_manifest.json"
PREVIOUS_MANIFEST = "_manifest-previous.json"
SUCCESS = "_SUCCESS"
ATTEMPT = "_attempt.json"
STAGING_PREFIX = "_staging-"

# Crash injection for the exactly-once tests: with BLIP_MODERATE_CRASH_AT=<step> the process
# ends at once (os._exit: no cleanup, no finally) when the commit reaches that step. Steps, in
# order: "staged" (pieces checked, nothing merged), "merge_writing" (in a merge task: partway
# through a file, no footer yet), "move_copied" (in a merge task on an object store: a file copied
# to its final name, its temporary not yet deleted), "half_merged" (half the files written),
# "merged" (all of them, nothing committed); then for Parquet "previous_written" (the replaced
# manifest kept as _manifest-previous.json, no new _manifest.json yet), "manifest_written" (no
# _SUCCESS yet), "success_written" (before tidy) and "half_tidied" (tidy partway through the
# replaced files); for Delta "delta_committed" (the commit is in the log, the run never learns it).
CRASH_ENV = "BLIP_MODERATE_CRASH_AT"
CRASH_EXIT = 86


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT)


class OutputError(ValueError):
    """The output location cannot take this run's result."""


class IncompleteError(RuntimeError):
    """The staged pieces do not cover every input row exactly once; nothing was committed."""


class VanishedError(IncompleteError):
    """Staged pieces disappeared during the merge: a concurrent run of the same attempt may have
    committed it and tidied its staging directory (the committer then looks)."""


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


def _piece_infos(location: Location, attempt: Attempt) -> dict[str, Piece]:
    """Piece name -> the piece where it is now: in staging, or moved into place by a commit of an
    earlier version of this job (which moved pieces instead of merging them) that was interrupted."""
    found = {}
    # Staging is listed first: a piece a concurrent commit moves between the two listings is
    # then seen in one of them (listing the other way round, it could be in neither).
    for info in _names(location, attempt.staging):
        if parse_piece(info.base_name):
            found[info.base_name] = Piece(info.base_name, info.path, info.size or 0)
    prefix = f"part-{attempt.run_id}-"
    for info in _names(location):
        if info.base_name.startswith(prefix) and parse_piece(info.base_name):
            name = info.base_name[len(prefix):]
            found[name] = Piece(name, info.path, info.size or 0)
    return found


def _pieces(location: Location, attempt: Attempt) -> dict[str, str]:
    return {name: piece.path for name, piece in _piece_infos(location, attempt).items()}


def staged_paths(location: Location, attempt: Attempt) -> list[str]:
    """Where this attempt's pieces are now (in staging, or moved into place by an interrupted commit)."""
    return sorted(_pieces(location, attempt).values())


def durable(location: Location, attempt: Attempt) -> dict[int, list[tuple[int, int]]]:
    """Row ranges per unit that an earlier, interrupted attempt already wrote."""
    return covered_ranges(list(_pieces(location, attempt)))


def _check_complete(pieces: dict, units: list[Unit]) -> None:
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


def move(fs: pafs.FileSystem, source: str, target: str) -> None:
    """``source`` to ``target``: a rename on local disk; on an object store a copy (published whole)
    then the delete, which is what a store's move is, with a crash point between the two."""
    if source == target:
        return
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.move(source, target)
        else:
            fs.copy_file(source, target)
            crash_point("move_copied")
            _delete_file(fs, source)
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
    """The merged files of staged pieces that cover every input row exactly once, and what they hold."""

    files: list[dict]
    rows: int
    by_status: dict[str, int]
    flagged: int
    flagged_by_reason: dict[str, int] = field(default_factory=dict)
    evidence_rows: int = 0

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.files]


def check_pieces(location: Location, attempt: Attempt, units: list[Unit]) -> dict[str, Piece]:
    """The staged pieces, once they cover every input row exactly once (else ``IncompleteError``);
    judged from their names alone."""
    pieces = _piece_infos(location, attempt)
    _check_complete(pieces, units)
    return pieces


def merge_pieces(location: Location, attempt: Attempt, pieces: dict[str, Piece], units: list[Unit],
                 empty_schema: pa.Schema, merger: Merger) -> Checked:
    """Merge the pieces into files of about the target size beside the staging directory (readers
    do not see them until the commit names them); counts what they hold."""
    fs = location.filesystem
    files = plan(attempt.run_id, list(pieces.values()), merger.staged_budget)
    tasks = [dict(f, output=location.uri, staging=attempt.staging) for f in files]
    done: dict[str, dict] = {}
    try:
        for result in merger.run(merge_file, tasks):
            done[result["name"]] = result
            if len(done) == len(tasks) // 2:
                crash_point("half_merged")
    except FileNotFoundError as exc:
        # A concurrent run of the same attempt committed and tidied the staging directory meanwhile.
        raise VanishedError(f"staged pieces disappeared during the merge ({exc}); nothing committed") from exc
    results = [done[f["name"]] for f in files]  # in row order
    if not results:
        # Zero input rows still commit a readable, typed (empty) result.
        name = f"part-{attempt.run_id}-empty.parquet"
        pq.write_table(empty_schema.empty_table(), location.join(name), filesystem=fs)
        info = fs.get_file_info(location.join(name))
        results = [dict(Tally().as_dict(), name=name, size=info.size, mtime_ms=(info.mtime_ns or 0) // 1_000_000)]
    rows = sum(r["rows"] for r in results)
    expected = sum(u.rows for u in units)
    if rows != expected:
        raise IncompleteError(f"row count mismatch: {expected} input rows, {rows} staged; nothing committed")
    by_status, by_reason = Counter(), Counter()
    for r in results:
        by_status.update(r["by_status"])
        by_reason.update(r["by_reason"])
    return Checked(
        results, rows, dict(sorted(by_status.items())), sum(r["flagged"] for r in results),
        dict(sorted(by_reason.items())), sum(r["evidence_rows"] for r in results),
    )


def manifest_body(manifest: dict, attempt: Attempt, checked: Checked) -> dict:
    """What a commit records (``_manifest.json``, or the Delta commit's metadata)."""
    return dict(
        manifest, run_id=attempt.run_id, key=attempt.key, files=checked.names, rows=checked.rows,
        rows_by_status=checked.by_status, flagged=checked.flagged,
        committed_at=datetime.now(timezone.utc).isoformat(),
        flagged_by_reason=checked.flagged_by_reason,
        evidence=dict(manifest.get("evidence") or {}, rows=checked.evidence_rows),
        output_files={
            "count": len(checked.files), "bytes": sum(f["size"] for f in checked.files),
            "target_file_mb": (manifest.get("config") or {}).get("target_file_mb"),
        },
    )


def commit(location: Location, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict,
           merger: Merger | None = None) -> CommitResult:
    """Check that every input row is staged exactly once, merge the pieces into files, write the
    manifest, then ``_SUCCESS``."""
    pieces = check_pieces(location, attempt, units)
    crash_point("staged")
    try:
        checked = merge_pieces(location, attempt, pieces, units, empty_schema, merger or Merger())
    except VanishedError:
        latest = read_manifest(location)
        if latest and latest.get("run_id") == attempt.run_id:
            raise AlreadyCommitted(latest) from None
        raise
    crash_point("merged")
    body = manifest_body(manifest, attempt, checked)
    replaced = read_manifest(location)
    if replaced and replaced.get("run_id") == attempt.run_id:
        raise AlreadyCommitted(replaced)  # a concurrent run of this attempt committed while this one merged
    if replaced:
        _write_json(location, PREVIOUS_MANIFEST, replaced)
        crash_point("previous_written")
    _write_json(location, MANIFEST, body)
    crash_point("manifest_written")
    _write_json(location, SUCCESS, {"run_id": attempt.run_id, "key": attempt.key, "committed_at": body["committed_at"]})
    crash_point("success_written")
    tidy(location, body)
    return CommitResult(checked.names, checked.rows, checked.by_status, checked.flagged, body)


def tidy(location: Location, committed: dict) -> None:
    """After a commit: remove the replaced result's files and the committed attempt's staging."""
    fs = location.filesystem
    _delete_file(fs, location.join(PREVIOUS_MANIFEST))
    keep = set(committed["files"])
    stale = [info.path for info in _names(location) if info.base_name.startswith("part-") and info.base_name not in keep]
    for deleted, path in enumerate(stale, 1):
        _delete_file(fs, path)
        if deleted == (len(stale) + 1) // 2:
            crash_point("half_tidied")
    _delete_dir(fs, staging_path(location, committed["key"]))


class ParquetCommitter:
    """The directory of Parquet files with ``_manifest.json`` and ``_SUCCESS`` (the default format)."""

    name = "parquet"

    def prepare(self, uri: str, overwrite: bool, key: str) -> Location:
        return prepare_output(uri, overwrite, key)

    def read_committed(self, location: Location) -> dict | None:
        return read_manifest(location)

    def commit(self, location: Location, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict,
               merger: Merger | None = None) -> CommitResult:
        return commit(location, attempt, units, empty_schema, manifest, merger)

    def tidy(self, location: Location, committed: dict) -> None:
        tidy(location, committed)
