"""The Delta Lake committer: the same staged, resumable pieces become a table's files in one commit.

Everything before the commit is ``output.py``'s: pieces are staged under ``_staging-<key>/``,
resumed after a crash, checked to cover every input row exactly once, and merged into files of
about ``--target-file-mb`` beside the staging directory (``merge.py``), where no Delta reader sees
them until the commit adds them. Then one
transaction through delta-rs (``deltalake``) registers them: it replaces the table's files (or,
with a partition, ``dt=D``'s files only, like ``replaceWhere``) with this run's, and carries

- ``custom_metadata["blip_moderate"]``: what ``_manifest.json`` holds for a Parquet output
  (run id, key, counts, files, config, models), so committed-ness is read from the log itself;
- an application transaction ``(blip-moderate-<key>, n)``: the txn id Delta's own conflict
  checker knows, so two runs of the same key can never both commit.

The one non-obvious decision: the application transaction is what stops a twin. Two runs of
one attempt check that it is not committed yet, then commit; the later one's commit is built on
a snapshot without the earlier's. delta-rs rebases a losing commit onto the winner when they do
not conflict, and a new partition's files do not conflict with anything, so without the txn the
twin would land the same rows a second time (``test_delta.py`` fails that way when the txn is
taken out). With it, delta-rs refuses the second commit (concurrent transaction for the same app
id); the run reloads the table, finds its run committed, and raises ``AlreadyCommitted``.

On S3 a commit is one conditional PUT of the next log entry (``If-None-Match``; delta-rs's
default since 1.0, no lock table, nothing to configure beyond the endpoint): two writers cannot
both create version N (moto answers the loser 412, as S3 does). Creating the table is made with
no commit retries, so that a lost creation race is not rebased into a second commit.

Files a commit replaces stay on storage until ``VACUUM`` (time travel needs them); the job
never deletes them. ``VACUUM`` skips ``_``-prefixed paths, so staging, ``_report.html`` and
``_runs/`` beside the table are safe from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from blip_ops import stores

from ..storage import Location, locate
from . import output
from .merge import Merger
from .output import AlreadyCommitted, Attempt, CommitResult, OutputError
from .units import Unit

LOG = "_delta_log"
METADATA_KEY = "blip_moderate"
APP_PREFIX = "blip-moderate-"
COMMIT_TRIES = 5
# Committed-ness is read from commit infos in the log, so a table this job creates keeps its log
# entries (delta-rs would otherwise delete those older than 30 days after a checkpoint).
LOG_SETTINGS = {"delta.enableExpiredLogCleanup": "false"}


@dataclass(frozen=True)
class Table:
    """A Delta table, and the partition (``{"dt": "2026-01-01"}``) a run writes; ``{}``: the whole table."""

    root: Location
    partition: dict

    @property
    def partition_name(self) -> str:
        return "/".join(f"{k}={v}" for k, v in self.partition.items())

    @property
    def data(self) -> Location:
        """Where this run's pieces, staging, report and run-summary row live."""
        if not self.partition:
            return self.root
        name = self.partition_name
        return Location(self.root.filesystem, self.root.join(name), self.root.uri.rstrip("/") + "/" + name)


def parse_partition(text: str | None) -> dict:
    """``"dt=2026-01-01"`` -> ``{"dt": "2026-01-01"}``; None or "" -> ``{}``."""
    if not text:
        return {}
    parts = {}
    for item in text.strip("/").split("/"):
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"partition must be NAME=VALUE, got {text!r}")
        parts[name] = value
    return parts


def storage_options(root: Location) -> dict | None:
    """delta-rs's object-store settings (it takes no filesystem object): ``blip_ops.stores`` builds
    them from the same environment the pyarrow and fsspec clients read; None for a local table."""
    return stores.storage_options(root.uri)


def _has_log(location: Location) -> bool:
    return location.filesystem.get_file_info(location.join(LOG)).type == pafs.FileType.Directory


def table_at(location: Location) -> Table | None:
    """The Delta table at ``location``, or the partition ``location`` is of (``TABLE/dt=D``); None otherwise."""
    try:
        if _has_log(location):
            return Table(location, {})
        parent, _, name = location.path.rstrip("/").rpartition("/")
        if "=" in name and parent:
            root = Location(location.filesystem, parent, location.uri.rstrip("/").rpartition("/")[0])
            if _has_log(root):
                return Table(root, parse_partition(name))
    except (OSError, ValueError):
        return None
    return None


def _open(table: Table):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(table.root.uri, storage_options=storage_options(table.root))
    except TableNotFoundError:
        return None


def _current_files(handle, table: Table) -> list[str]:
    """Paths (relative to the table) of the current version's files, of ``table.partition`` only."""
    actions = pa.table(handle.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    for name, value in table.partition.items():
        column = f"partition.{name}"
        if column not in actions.column_names:
            return []
        values = actions.column(column).to_pylist()
        paths = [p for p, v in zip(paths, values) if v == value]
    return sorted(paths)


def committed_partitions(table: Table) -> dict[str, dict]:
    """For a table partitioned by this job (nightly): ``{"dt=D": manifest}`` of every partition whose
    current files are this job's latest commit of it, as ``read_committed`` answers per partition,
    from one walk of the log (newest first, stopping once every current partition is decided)."""
    handle = _open(table)
    if handle is None or not handle.metadata().partition_columns:
        return {}
    actions = pa.table(handle.get_add_actions(flatten=True))
    columns = list(handle.metadata().partition_columns)
    current: dict[str, list[str]] = {}
    for path, *values in zip(actions.column("path").to_pylist(), *(actions.column(f"partition.{c}").to_pylist() for c in columns)):
        current.setdefault(Table(table.root, dict(zip(columns, values))).partition_name, []).append(path)
    found: dict[str, dict] = {}
    decided: set[str] = set()
    for info in _history(handle, table):
        body = info.get(METADATA_KEY)
        if not isinstance(body, dict) or not body.get("partition"):
            continue
        part = Table(table.root, body["partition"])
        name = part.partition_name
        if name in decided:
            continue
        decided.add(name)
        if _relative(part, body["files"]) == sorted(current.get(name, [])):
            found[name] = dict(body, table_version=info.get("version"))
        if decided >= set(current):
            break
    return found


def _relative(table: Table, files: list[str]) -> list[str]:
    prefix = f"{table.partition_name}/" if table.partition else ""
    return sorted(prefix + name for name in files)


def _history(handle, table: Table):
    """Commit infos, newest first, read from the log entries themselves (one small JSON each).
    Not ``DeltaTable.history()``: in delta-rs 1.6.6 it holds the GIL while it waits on storage,
    which deadlocks against an S3 server in the same process (the moto server of the tests)."""
    fs = table.root.filesystem
    for version in range(handle.version(), -1, -1):
        try:
            with fs.open_input_stream(table.root.join(LOG, f"{version:020d}.json")) as stream:
                lines = stream.read().decode().splitlines()
        except FileNotFoundError:
            return  # older entries were cleaned up (the job's tables keep them: LOG_SETTINGS)
        for line in lines:
            if line.startswith('{"commitInfo"'):
                yield dict(json.loads(line)["commitInfo"], version=version)
                break


def _committed(handle, table: Table) -> dict | None:
    current = _current_files(handle, table)
    partitioned_root = not table.partition and handle.metadata().partition_columns
    for info in _history(handle, table):
        body = info.get(METADATA_KEY)
        if not isinstance(body, dict):
            continue
        if partitioned_root:  # the whole of a partitioned table: its newest result still in place
            if set(_relative(Table(table.root, body.get("partition") or {}), body["files"])) <= set(current):
                return dict(body, table_version=info.get("version"))
            continue
        if (body.get("partition") or {}) != table.partition:
            continue
        # Our latest commit of this partition; it is the committed result while the table still holds exactly its files.
        if _relative(table, body["files"]) == current:
            return dict(body, table_version=info.get("version"))
        return None
    return None


def read_committed(table: Table) -> dict | None:
    """The committed manifest of ``table`` (its partition), read from the Delta log; None if none."""
    handle = _open(table)
    return _committed(handle, table) if handle is not None else None


def committed_files(table: Table) -> list[str]:
    """Paths (for pyarrow with ``table.root.filesystem``) of the current version's files."""
    handle = _open(table)
    if handle is None:
        return []
    return [table.root.join(path) for path in _current_files(handle, table)]


def _is_ours(name: str) -> bool:
    return name.startswith("_") or name.startswith("part-") or "=" in name


def prepare(table: Table, overwrite: bool, key: str) -> Location:
    """Refuse what the Parquet committer refuses (a different result without ``overwrite``,
    foreign files), a Parquet output, and a table partitioned otherwise than this run."""
    fs = table.root.filesystem
    if fs.get_file_info(table.root.path).type == pafs.FileType.File:
        raise OutputError(f"output {table.root.uri} is a file; it must be a directory or prefix")
    handle = _open(table) if _has_log(table.root) else None
    if handle is None:
        entries = output._names(table.root)
        if any(e.base_name == output.MANIFEST for e in entries):
            raise OutputError(f"output {table.root.uri} holds a Parquet output; choose another location for a Delta table")
        output.refuse_foreign(entries, table.root.uri, _is_ours)
    else:
        columns = list(handle.metadata().partition_columns)
        if columns != list(table.partition):
            raise OutputError(
                f"Delta table {table.root.uri} is partitioned by {columns or 'nothing'}, "
                f"this run writes {list(table.partition) or 'the whole table'}"
            )
        committed = _committed(handle, table)
        if not overwrite and committed and committed.get("key") != key:
            raise OutputError(
                f"output {table.data.uri} holds a result of another input or configuration (run {committed.get('run_id')}); "
                "pass --overwrite to replace it"
            )
        if not overwrite and not committed and _current_files(handle, table):
            raise OutputError(
                f"Delta table {table.data.uri} holds rows this job did not commit; pass --overwrite to replace them"
            )
    fs.create_dir(table.data.path, recursive=True)
    return table.data


def _table_schema(handle, schema: pa.Schema, table: Table) -> pa.Schema:
    """This run's columns plus the partition columns, merged into the table's: a column the table
    lacks is added (schema evolution), one this run lacks stays (older files read it as null)."""
    clash = [name for name in table.partition if name in schema.names]
    if clash:
        raise OutputError(f"partition column(s) {clash} are also output columns; rename them in the input")
    ours = pa.schema(list(schema) + [pa.field(name, pa.string()) for name in table.partition])
    if handle is None:
        return ours
    existing = pa.schema(handle.schema().to_arrow())
    fields = list(existing)
    for field in ours:
        if field.name not in existing.names:
            fields.append(field)
        elif not existing.field(field.name).type.equals(field.type):
            raise OutputError(
                f"column {field.name!r} is {field.type} in this run but {existing.field(field.name).type} in table {table.root.uri}"
            )
    return pa.schema(fields)


def _add_action(table: Table, written: dict):
    """The add action of a merged file, from what its merge task reported (no footer read here)."""
    from deltalake.transaction import AddAction

    path = f"{table.partition_name}/{written['name']}" if table.partition else written["name"]
    return AddAction(path, written["size"], dict(table.partition), written["mtime_ms"], True,
                     json.dumps({"numRecords": written["rows"]}))


def app_id(key: str) -> str:
    return APP_PREFIX + key


def _commit_once(table: Table, handle, adds: list, schema: pa.Schema, body: dict, key: str) -> None:
    from deltalake import CommitProperties, Transaction
    from deltalake import Schema as DeltaSchema
    from deltalake.transaction import create_table_with_add_actions

    previous = handle.transaction_version(app_id(key)) if handle is not None else None
    properties = CommitProperties(
        custom_metadata={METADATA_KEY: body},
        app_transactions=[Transaction(app_id(key), 0 if previous is None else previous + 1)],
    )
    partition_by = list(table.partition) or None
    if handle is None:
        # Creating the table must be exclusive: on a lost race delta-rs would otherwise rebase the
        # create onto the winner's table as version 1, app transaction or not (seen on S3: the
        # loser's PUT of version 0 refused with 412, then its version 1 accepted).
        properties.max_commit_retries = 0
        create_table_with_add_actions(
            table.root.uri, DeltaSchema.from_arrow(schema), adds, mode="error", partition_by=partition_by,
            configuration=LOG_SETTINGS, storage_options=storage_options(table.root), commit_properties=properties,
        )
    else:
        filters = [(name, "=", value) for name, value in table.partition.items()] or None
        handle.create_write_transaction(
            adds, "overwrite", schema, partition_by=partition_by, partition_filters=filters, commit_properties=properties,
        )


def commit(table: Table, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict,
           merger: Merger | None = None) -> CommitResult:
    """One Delta commit of every staged row (once each); ``AlreadyCommitted`` if a twin run made it."""
    from deltalake.exceptions import DeltaError

    location = table.data
    pieces = output.check_pieces(location, attempt, units)
    output.crash_point("staged")
    try:
        checked = output.merge_pieces(location, attempt, pieces, units, empty_schema, merger or Merger())
    except output.VanishedError:
        latest = read_committed(table)
        if latest and latest.get("run_id") == attempt.run_id:
            raise AlreadyCommitted(latest) from None
        raise
    output.crash_point("merged")
    body = dict(output.manifest_body(manifest, attempt, checked), partition=table.partition, format="delta")
    adds = [_add_action(table, written) for written in checked.files]
    for attempt_number in range(COMMIT_TRIES):
        handle = _open(table)
        if handle is not None:
            committed = _committed(handle, table)
            if committed and committed.get("run_id") == attempt.run_id:
                raise AlreadyCommitted(committed)
        try:
            _commit_once(table, handle, adds, _table_schema(handle, empty_schema, table), body, attempt.key)
            break
        except DeltaError:
            # Another commit landed since ``handle`` was read (or the table was created meanwhile): look again.
            if attempt_number == COMMIT_TRIES - 1:
                raise
    output.crash_point("delta_committed")
    tidy(table, body)
    return CommitResult(checked.names, checked.rows, checked.by_status, checked.flagged, body)


def tidy(table: Table, committed: dict) -> None:
    """After a commit: remove the committed attempt's staging, and files of the committed run that
    its commit does not hold (merged with another target size by an interrupted try, or pieces an
    older version of the job moved in). Replaced files of earlier commits stay, for time travel."""
    fs = table.root.filesystem
    keep = set(committed["files"])
    prefix = f"part-{committed['run_id']}-"
    for info in output._names(table.data):
        if info.base_name.startswith(prefix) and info.base_name not in keep:
            output._delete_file(fs, info.path)
    output._delete_dir(fs, output.staging_path(table.data, committed["key"]))


class DeltaCommitter:
    """``ParquetCommitter``'s interface for a Delta table at ``uri`` (and a partition of it)."""

    name = "delta"

    def __init__(self, uri: str, partition: str | None = None):
        self.table = Table(locate(uri), parse_partition(partition))

    def prepare(self, uri: str, overwrite: bool, key: str) -> Location:
        return prepare(self.table, overwrite, key)

    def read_committed(self, location: Location) -> dict | None:
        return read_committed(self.table)

    def commit(self, location: Location, attempt: Attempt, units: list[Unit], empty_schema: pa.Schema, manifest: dict,
               merger: Merger | None = None) -> CommitResult:
        return commit(self.table, attempt, units, empty_schema, manifest, merger)

    def tidy(self, location: Location, committed: dict) -> None:
        tidy(self.table, committed)


def committer_for(config) -> "output.ParquetCommitter | DeltaCommitter":
    """The committer ``config.output_format`` names."""
    if config.output_format == "delta":
        return DeltaCommitter(config.output, config.output_partition)
    return output.ParquetCommitter()
