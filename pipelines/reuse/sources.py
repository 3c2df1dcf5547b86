"""``--reuse`` sources: committed outputs of earlier runs, checked before any model loads.

A source is usable only as a whole committed result (``_SUCCESS`` and its manifest): its rows
are read from the files its manifest lists, never from a directory listing, so a run being
written beside it, or an interrupted one, is never read. Whether its rows can match is decided
per source from the content-key digests its manifest records: an output written before keys
existed, or by other models or settings, has other (or no) digests and matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from .. import keys as K
from ..commit.output import read_committed
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

    @property
    def identity(self) -> list:
        """What the resume key holds: the committed result, not where it lies."""
        return ["reuse", self.run_id, self.key]

    def digest(self, side: str) -> str | None:
        return self.score_digest if side == "score" else self.caption_digest


def open_source(uri: str) -> ReuseSource:
    try:
        location = locate(uri)
        info = location.filesystem.get_file_info(location.path)
    except (OSError, ValueError) as exc:
        raise ReuseSourceError(f"--reuse source {uri} cannot be read: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise ReuseSourceError(f"--reuse source does not exist: {uri}")
    try:
        manifest = read_committed(location)
    except (OSError, ValueError) as exc:
        raise ReuseSourceError(f"--reuse source {uri} cannot be read: {exc}") from None
    if manifest is None:
        raise ReuseSourceError(f"--reuse source {uri} holds no committed result (no _SUCCESS and manifest)")
    files = tuple(location.join(name) for name in manifest.get("files", []))
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
    )


def open_sources(uris) -> list[ReuseSource]:
    return [open_source(uri) for uri in uris]
