"""``--reuse`` sources: committed outputs of earlier runs, checked before any model loads.

A source is usable only as a whole committed result (``_SUCCESS`` and its manifest): its rows
are read from the files its manifest lists, never from a directory listing, so a run being
written beside it, or an interrupted one, is never read. Whether its rows can match is decided
per source from the content-key digests its manifest records: an output written before keys
existed, or by other models or settings, has other (or no) digests and matches nothing.

A Delta output is read the same way, from its log: the files of the table's current snapshot (of
one partition for ``TABLE/dt=D``), never the files on disk, which keep replaced versions for time
travel; its manifest is the job's commit metadata of that snapshot. The file list is taken once,
before any model loads, so a commit landing meanwhile does not change what this run reads (the
files it replaces stay until ``VACUUM``). A table partitioned by ``dt`` (a nightly table) named
whole is one source per committed partition, the most recent first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from .. import keys as K
from ..commit import delta
from ..commit.reader import read_committed
from ..storage import Location, locate

# The manifest entry holding a committed output's key digests ({"score": ..., "caption": ...}).
MANIFEST_KEYS = "content_keys"

SCORE_VALUES = ["itc_score", "itm_score", "text_truncated", "scored_at", "scores_from_run"]
CAPTION_VALUES = ["caption", "caption_from_run"]
NEEDED_COLUMNS = {K.IMAGE_SHA256, K.TEXT_SHA256, "status", *SCORE_VALUES, *CAPTION_VALUES}


class ReuseSourceError(ValueError):
    """A --reuse source that does not exist, is not committed, or cannot be read."""


@dataclass(frozen=True)
class ReuseSource:
    uri: str
    location: Location
    run_id: str
    key: str
    files: tuple[str, ...]  # full paths on location.filesystem
    score_digest: str | None
    caption_digest: str | None
    label_digest: str | None = None  # written with --labels (pipelines.keys.LabelSettings)

    @property
    def identity(self) -> list:
        """What the resume key holds: the committed result, not where it lies."""
        return ["reuse", self.run_id, self.key]

    def digest(self, side: str) -> str | None:
        return {"score": self.score_digest, "caption": self.caption_digest, "label": self.label_digest}[side]


def open_source(uri: str) -> ReuseSource:
    """One source; a partitioned Delta table named whole is refused here (``open_sources`` expands it)."""
    sources = _open(uri)
    if len(sources) != 1:
        raise ReuseSourceError(f"--reuse source {uri} is a partitioned Delta table: name one partition (TABLE/dt=D)")
    return sources[0]


def _open(uri: str) -> list[ReuseSource]:
    try:
        location = locate(uri)
        info = location.filesystem.get_file_info(location.path)
    except (OSError, ValueError) as exc:
        raise ReuseSourceError(f"--reuse source {uri} cannot be read: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise ReuseSourceError(f"--reuse source does not exist: {uri}")
    table = delta.table_at(location)
    if table is not None:
        return _open_delta(uri, table)
    try:
        manifest = read_committed(location)
    except (OSError, ValueError) as exc:
        raise ReuseSourceError(f"--reuse source {uri} cannot be read: {exc}") from None
    if manifest is None:
        raise ReuseSourceError(f"--reuse source {uri} holds no committed result (no _SUCCESS and manifest)")
    files = tuple(location.join(name) for name in manifest.get("files", []))
    return [_source(uri, location, manifest, files)]


def _open_delta(uri: str, table: delta.Table) -> list[ReuseSource]:
    """The committed snapshot of a Delta table (or of one partition); a table partitioned by
    ``dt`` named whole: each partition whose current files are a commit of this job, newest first."""
    try:
        whole = {} if table.partition else delta.committed_partitions(table)
        if whole:  # a nightly table named whole: its committed days, the most recent first
            opened = [(delta.Table(table.root, manifest["partition"]), manifest)
                      for _, manifest in sorted(whole.items(), reverse=True)]
        else:
            manifest = delta.read_committed(table)
            opened = [(table, manifest)] if manifest is not None else []
        if not opened:
            raise ReuseSourceError(f"--reuse source {uri} is a Delta table whose current version holds no committed result of this job")
        return [_source(t.data.uri, t.root, manifest, tuple(delta.committed_files(t))) for t, manifest in opened]
    except ReuseSourceError:
        raise
    except Exception as exc:  # noqa: BLE001  (delta-rs raises its own errors for unreadable logs)
        raise ReuseSourceError(f"--reuse source {uri} cannot be read as a Delta table: {type(exc).__name__}: {exc}") from None


def _source(uri: str, location: Location, manifest: dict, files: tuple[str, ...]) -> ReuseSource:
    try:
        found = location.filesystem.get_file_info(list(files))
    except OSError as exc:
        raise ReuseSourceError(f"--reuse source {uri} cannot be read: {exc}") from None
    lost = [f.path for f in found if f.type != pafs.FileType.File]
    if lost:
        raise ReuseSourceError(f"--reuse source {uri} lacks files its manifest lists (first: {lost[0]})")
    digests = manifest.get(MANIFEST_KEYS) or {}
    return ReuseSource(
        uri=uri,
        location=location,
        run_id=str(manifest.get("run_id")),
        key=str(manifest.get("key")),
        files=files,
        score_digest=digests.get("score"),
        caption_digest=digests.get("caption"),
        label_digest=digests.get("label"),
    )


def open_sources(uris) -> list[ReuseSource]:
    return [source for uri in uris for source in _open(uri)]
