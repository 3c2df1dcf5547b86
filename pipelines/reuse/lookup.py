"""Reuse for rows already in memory (notebook audits): look their keys up in ``--reuse`` sources.

An audit holds its sampled rows on the driver anyway, so the lookup is direct: each matching
source file is read only for the rows whose image hash is among the sample's (a pyarrow
filter), never whole. Batch runs use the keyed plan (``passes``) instead, which never gathers keys.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .. import keys as K
from ..schema import IMAGE_EMBEDDING_BYTES, TEXT_EMBEDDING_BYTES
from ..storage import read_uris
from .passes import CAPTION_VALUE_FIELDS, SCORE_VALUE_FIELDS, _text_problem
from .sources import NEEDED_COLUMNS, ReuseSource

EMBEDDING_BYTES = (IMAGE_EMBEDDING_BYTES, TEXT_EMBEDDING_BYTES)

# An audit's reused rows take the scores only; their evidence is not looked up (see jobs.audit).
_SCORE_FIELDS = [f for f in SCORE_VALUE_FIELDS if f.name not in ("__image_error", "evidence", *EMBEDDING_BYTES)]


def content_hashes(table: pa.Table, text_column: str, image_column: str, from_uri: bool, http=None) -> tuple[pa.Array, pa.Array]:
    values = table.column(image_column).to_pylist()
    if from_uri:  # each distinct URI read once; one that cannot be read has no hash
        values = [v if isinstance(v, bytes) else None for v in read_uris(values, http=http)]
    images = [K.sha256_hex(value) for value in values]
    texts = table.column(text_column).to_pylist()
    return pa.array(images, pa.string()), pa.array([K.text_sha256(t) for t in texts], pa.string())


def lookup(table: pa.Table, config, digests: dict, sources: list[ReuseSource]) -> pa.Table:
    """Per row of ``table``: the content hashes and, where a source holds them, the reused score and
    caption values (null where not found). The first source listed wins."""
    image_sha, text_sha = content_hashes(
        table, config.text_column, config.image_uri_column or config.image_column, bool(config.image_uri_column),
        config.http_settings(),
    )
    texts = table.column(config.text_column).to_pylist()
    scorable = pa.array([None if _text_problem(t) else h for t, h in zip(texts, text_sha.to_pylist())], pa.string())
    score_keys = K.score_keys(digests["score"], image_sha, scorable).to_pylist()
    caption_digest = digests.get("caption") if config.captioning else None
    caption_keys = K.caption_keys(caption_digest, image_sha).to_pylist() if caption_digest else [None] * table.num_rows
    wanted = pa.array(sorted({h for h in image_sha.to_pylist() if h is not None}), pa.string())
    found_scores, found_captions = {}, {}
    for source in sources:
        sides = [s for s in ("score", "caption") if digests.get(s) and source.digest(s) == digests[s]]
        if not sides or not len(wanted):
            continue
        for path in source.files:
            dataset = pads.dataset(path, filesystem=source.location.filesystem, format="parquet")
            if not NEEDED_COLUMNS <= set(dataset.schema.names):
                continue  # written before keys existed: matches nothing
            rows = dataset.to_table(columns=sorted(NEEDED_COLUMNS), filter=pc.field(K.IMAGE_SHA256).isin(wanted))
            if "score" in sides:
                ok = rows.filter(pc.fill_null(pc.and_(pc.equal(rows.column("status"), "ok"), rows.column("itc_score").is_valid()), False))
                keys = K.score_keys(digests["score"], ok.column(K.IMAGE_SHA256), ok.column(K.TEXT_SHA256)).to_pylist()
                values = ok.select([f.name for f in _SCORE_FIELDS]).to_pylist()
                for key, value in zip(keys, values):
                    found_scores.setdefault(key, value)
            if "caption" in sides:
                captioned = rows.filter(rows.column("caption").is_valid())
                keys = K.caption_keys(digests["caption"], captioned.column(K.IMAGE_SHA256)).to_pylist()
                for key, value in zip(keys, captioned.select(["caption", "caption_from_run"]).to_pylist()):
                    found_captions.setdefault(key, value)
    scores = [found_scores.get(k) if k else None for k in score_keys]
    captions = [found_captions.get(k) if k else None for k in caption_keys]
    columns = {K.IMAGE_SHA256: image_sha, K.TEXT_SHA256: text_sha}
    for field in _SCORE_FIELDS:
        columns[field.name] = pa.array([s[field.name] if s else None for s in scores], field.type)
    for field in CAPTION_VALUE_FIELDS:
        columns[field.name] = pa.array([c[field.name] if c else None for c in captions], field.type)
    columns["__scores_found"] = pa.array([s is not None for s in scores])
    columns["__caption_found"] = pa.array([c is not None for c in captions])
    return pa.table(columns)
