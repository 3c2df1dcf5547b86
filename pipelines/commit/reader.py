"""Reading a committed result, whichever committer wrote it: the one reader both serve.

A Parquet output answers from the manifest its ``_SUCCESS`` names (``output.read_manifest``); a
Delta table, or one partition of it (``TABLE/dt=D``), from its log (``delta``). Readers (report,
calibrate, review export, ``--reuse`` and audit sources, nightly) call this module, so neither
committer reaches into the other: ``delta`` builds on ``output``, and ``output`` knows nothing of
``delta``.
"""

from __future__ import annotations

from ..storage import Location, locate
from . import delta
from .output import read_manifest


def read_committed(location: Location) -> dict | None:
    """The committed manifest, or None when the output has no complete result. A Delta table
    (or one partition of it, ``TABLE/dt=D``) answers from its log (``delta.read_committed``)."""
    table = delta.table_at(location)
    if table is not None:
        return delta.read_committed(table)
    return read_manifest(location)


def committed_files(uri: str) -> list[str]:
    """Paths of the committed result's files (for pyarrow with the same filesystem); [] if none.
    For a Delta table: the files of its current version (of one partition for ``TABLE/dt=D``)."""
    location = locate(uri)
    table = delta.table_at(location)
    if table is not None:
        return delta.committed_files(table)
    manifest = read_manifest(location)
    return [location.join(name) for name in manifest["files"]] if manifest else []
