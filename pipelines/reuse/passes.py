"""The keyed plan: each unique pair scored once, each unique image captioned once, earlier
outputs reused, as passes over files in the run's staging (a hand-rolled Grace hash join).

Why files and buckets rather than Ray Data's ``Dataset.join``: the join needs polars (not a
dependency here) and its hash shuffle took 7.3 s for 2,000 rows on these 2 cores per shuffle,
of which a plan needs several; here every pass is a set of independent tasks over small files,
no task holds more than one bucket of keys (``KEYS_PER_BUCKET``) or one unit of image bytes,
and image bytes never leave the unit that holds them. The passes, each a set of tasks:

1. ``hash_unit`` (per unit): hash every row's image bytes and text; write the unit's keys
   (``keys/``) and each (key, position) into its bucket (``sk/``, ``ck/``). No image survives it.
   ``source_file`` (per file of a ``--reuse`` source whose digest matches): its rows' values
   into the same buckets (``sr/``, ``cr/``).
2. ``plan_bucket`` (per bucket and side): a key found in a source is reused (first source
   listed wins); any other key is computed once, at its first position (``splan/``, ``cplan/``).
3. ``compute_rows`` reads, per unit, only the rows to compute (the plans' positions for the unit,
   plus rows with no key, whose image must still be decoded to say what is wrong); the model
   stages run on them; ``store_results`` puts each value under its key (``sval/``, ``cval/``).
4. ``distribute_bucket`` (per bucket and side): every position of a key gets its value, into a
   file per unit (``sdist/``, ``cdist/``).
5. ``assemble_unit`` (per unit): the unit's rows without their image column, with those values,
   in row order, ready for flags and the writer.

A position is ``unit << 32 | row``: unique in a run and ordered like the input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from blip_ops.texts import text_problem

from .. import keys as K
from .. import schema as S
from ..commit.pieces import ROW, UNIT, read_units
from ..storage import FetchCache, is_http, read_uris
from .sources import CAPTION_VALUES, SCORE_VALUES

# Keys a plan task holds at once; a run's buckets are its rows over this. About 100 MB per task.
KEYS_PER_BUCKET = int(os.environ.get("BLIP_MODERATE_KEYS_PER_BUCKET", 2_000_000))

KEY = "__key"
POS = "__pos"
PRIO = "__prio"
REP = "__rep"  # the position whose model call computed a value; null for reused values
SKEY = "__score_key"
CKEY = "__caption_key"
LKEY = "__label_key"
DO_SCORE = "__do_score"
DO_CAPTION = "__do_caption"
DO_LABEL = "__do_label"  # = pipelines.dataflow.stages.LABEL_ROWS
WORK = "_work"

_TS = pa.timestamp("us", tz="UTC")
SCORE_VALUE_FIELDS = [
    pa.field("itc_score", pa.float32()), pa.field("itm_score", pa.float32()), pa.field("text_truncated", pa.bool_()),
    pa.field("scored_at", _TS), pa.field("scores_from_run", pa.string()), pa.field(S.IMAGE_ERROR, pa.string()),
    # Grad-CAM travels with the scores it explains (the same pair, the same model and settings).
    pa.field("evidence", S.EVIDENCE_TYPE),
    # --embeddings: the projections the scores come from, as raw float16 bytes (pipelines.vectors).
    pa.field(S.IMAGE_EMBEDDING_BYTES, pa.binary()), pa.field(S.TEXT_EMBEDDING_BYTES, pa.binary()),
]
CAPTION_VALUE_FIELDS = [pa.field("caption", pa.string()), pa.field("caption_from_run", pa.string())]
# Labels (--labels) are a side of their own, keyed by (image, declared category): a row's labels do
# not depend on its text, so listings sharing a photo and a category share one label computation.
LABEL_VALUE_FIELDS = list(S.LABEL_FIELDS)
VALUE_FIELDS = {"score": SCORE_VALUE_FIELDS, "caption": CAPTION_VALUE_FIELDS, "label": LABEL_VALUE_FIELDS}
SIDES = {"score": ("sk", "sr", "splan", "sval", "sdist"), "caption": ("ck", "cr", "cplan", "cval", "cdist"),
         "label": ("lk", "lr", "lplan", "lval", "ldist")}
# Count names per side (plan_bucket, distribute_bucket).
_PLURAL = {"score": "scores", "caption": "captions", "label": "labels"}
_DUPLICATES = {"score": "duplicate_pairs", "caption": "duplicate_images", "label": "duplicate_labels"}


def bucket_count(rows: int) -> int:
    return max(1, math.ceil(rows / KEYS_PER_BUCKET))


def positions(units: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (units.astype(np.int64) << 32) | rows.astype(np.int64)


def _bucket_of(keys: pa.Array, buckets: int) -> np.ndarray:
    return np.array([int(k[:8], 16) % buckets for k in keys.to_pylist()], dtype=np.int64)


def _write(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    directory = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(directory, recursive=True)
        # A task retried after a crash must not leave half a file under a name the next pass reads.
        temporary = f"{directory}/.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, filesystem=fs)
        fs.move(temporary, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def _read_dir(fs: pafs.FileSystem, directory: str, schema: pa.Schema, filter=None) -> pa.Table:
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True, recursive=False))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not files:
        return schema.empty_table()
    table = pads.dataset(files, filesystem=fs, format="parquet", schema=schema).to_table(filter=filter)
    return table


def _bucketed(fs, work: str, side_dir: str, name: str, table: pa.Table, buckets: int) -> None:
    """Write ``table``'s rows into their keys' buckets, one file per bucket holding any."""
    if not table.num_rows:
        return
    which = _bucket_of(table.column(KEY), buckets)
    for bucket in np.unique(which):
        _write(fs, f"{work}/{side_dir}/b{bucket:05d}/{name}.parquet", table.filter(pa.array(which == bucket)))


def _text_problem(text) -> bool:
    # The decode stage's own rule (blip_ops.texts): a text of invisible characters only is blank too.
    return text_problem(text) is not None


KEYS_FILE_SCHEMA = pa.schema([
    pa.field(ROW, pa.int64()), pa.field(K.IMAGE_SHA256, pa.string()), pa.field(K.TEXT_SHA256, pa.string()),
    pa.field(SKEY, pa.string()), pa.field(CKEY, pa.string()), pa.field(LKEY, pa.string()),
])
KEY_POS_SCHEMA = pa.schema([pa.field(KEY, pa.string()), pa.field(POS, pa.int64())])


def hash_unit(
    items: pa.Table, *, filesystem, schema, batch_rows: int, text_column: str, image_column: str, from_uri: bool,
    score_digest: str, caption_digest: str | None, work_fs, work: str, buckets: int, max_image_bytes: int | None = None,
    label_digest: str | None = None, labels: str | None = None, http=None,
) -> pa.Table:
    """Pass 1 for units: content hashes and keys of every wanted row, bucketed (``labels``: the
    label file as JSON, whose names say what a declared category means). Image URLs come from the
    work directory's fetch cache (``fetch_urls`` filled it)."""
    label_set = _label_set(labels) if label_digest else None
    counts = {"rows": 0, "keyless": 0}
    cache = fetch_cache(work_fs, work) if from_uri else None
    for table in read_units(items, filesystem=filesystem, schema=schema, batch_rows=batch_rows):
        unit, first = int(table.column(UNIT)[0].as_py()), int(table.column(ROW)[0].as_py())
        texts = table.column(text_column).to_pylist()
        images, oversized = [], []
        values = table.column(image_column).to_pylist()
        # A URI that cannot be read (too large included: never read whole) gets no key; the compute
        # pass decodes it and says why.
        loaded = read_uris(values, max_image_bytes, http, cache) if from_uri else values
        for value in loaded:
            if from_uri and not isinstance(value, bytes):
                value = None
            images.append(K.sha256_hex(value))
            # Over the byte limit (a bytes column; a URI is never read that far): no key, so the
            # compute pass decodes it and says why, and no earlier run's value is taken for it.
            oversized.append(value is not None and max_image_bytes is not None and len(value) > max_image_bytes)
        image_sha = pa.array(images, pa.string())
        keyed_image = pa.array([None if big else h for h, big in zip(images, oversized)], pa.string())
        text_sha = pa.array([K.text_sha256(t) for t in texts], pa.string())
        # A blank text is an error row: it never matches nor merges.
        scorable_text = pa.array([None if _text_problem(t) else h for t, h in zip(texts, text_sha.to_pylist())], pa.string())
        score_key = K.score_keys(score_digest, keyed_image, scorable_text)
        caption_key = K.caption_keys(caption_digest, keyed_image) if caption_digest else pa.nulls(len(texts), pa.string())
        label_key = pa.nulls(len(texts), pa.string())
        if label_set is not None:
            label_key = K.label_keys(label_digest, keyed_image, _category_tokens(label_set, table, scorable_text))
        rows = table.column(ROW)
        _write(work_fs, f"{work}/keys/u{unit:06d}/r{first:010d}.parquet", pa.Table.from_arrays(
            [rows, image_sha, text_sha, score_key, caption_key, label_key], schema=KEYS_FILE_SCHEMA))
        pos = pa.array(positions(table.column(UNIT).to_numpy(), rows.to_numpy()))
        name = f"u{unit:06d}-r{first:010d}"
        for side_dir, column in (("sk", score_key), ("ck", caption_key), ("lk", label_key)):
            keyed = pa.Table.from_arrays([column, pos], schema=KEY_POS_SCHEMA).filter(column.is_valid())
            _bucketed(work_fs, work, side_dir, name, keyed, buckets)
        counts["rows"] += table.num_rows
        counts["keyless"] += score_key.null_count
    return pa.table({k: [v] for k, v in counts.items()})


def _label_set(labels: str):
    """The parsed label file from its JSON (as ``dataflow.labelling.label_set`` reads it for the actors)."""
    import json

    from ..labels import LabelSet

    return LabelSet(json.loads(labels))


def _category_tokens(label_set, table: pa.Table, usable: pa.Array) -> pa.Array:
    """Per row the declared category as the label key reads it; null where ``usable`` is (not scored)."""
    column = label_set.column
    values = table.column(column).to_pylist() if column and column in table.column_names else [None] * table.num_rows
    return pa.array([None if ok is None else label_set.key_token(v) for v, ok in zip(values, usable.to_pylist())], pa.string())


def fetch_cache(work_fs, work: str) -> FetchCache:
    """Where this attempt keeps the image URLs it fetched (``storage.FetchCache``)."""
    return FetchCache(work_fs, f"{work}/fetched")


URL_SCHEMA = pa.schema([pa.field("url", pa.string())])


def url_unit(items: pa.Table, *, filesystem, schema, batch_rows: int, image_column: str, work_fs, work: str, buckets: int) -> pa.Table:
    """Pass 0 for image URLs: a unit's distinct http(s) URLs, into buckets by URL. Each bucket is then
    fetched by one task (``fetch_urls``), so a URL shared by rows of many units is fetched once, not
    once by every hash task that meets it at the same moment (seen: 3 requests for 2 units)."""
    urls: set[str] = set()
    unit = None
    for table in read_units(items, filesystem=filesystem, schema=schema, batch_rows=batch_rows):
        unit = int(table.column(UNIT)[0].as_py())
        for value in table.column(image_column).to_pylist():
            if value is not None and is_http(str(value).strip()):
                urls.add(str(value).strip())
    if urls:
        column = pa.array(sorted(urls), pa.string())
        keys = pa.array([hashlib.sha256(u.encode()).hexdigest() for u in column.to_pylist()], pa.string())
        which = _bucket_of(keys, buckets)
        for bucket in np.unique(which):
            _write(work_fs, f"{work}/urls/b{bucket:05d}/u{unit:06d}.parquet",
                   pa.Table.from_arrays([column], schema=URL_SCHEMA).filter(pa.array(which == bucket)))
    return pa.table({"urls": [len(urls)]})


def fetch_urls(items: pa.Table, *, work_fs, work: str, max_image_bytes: int | None, http) -> pa.Table:
    """Pass 0, second half: fetch one bucket's distinct URLs into the work directory's fetch cache."""
    fetched = failed = 0
    for item in items.to_pylist():
        urls = _read_dir(work_fs, f"{work}/urls/b{item['bucket']:05d}", URL_SCHEMA).column("url").to_pylist()
        for value in read_uris(sorted(set(urls)), max_image_bytes, http, fetch_cache(work_fs, work)):
            fetched += isinstance(value, bytes)
            failed += not isinstance(value, bytes)
    return pa.table({"image_urls_fetched": [fetched], "image_url_errors": [failed]})


def source_file(
    items: pa.Table, *, digests: dict, work_fs, work: str, buckets: int, labels: str | None = None, embeddings: str = "none"
) -> pa.Table:
    """Pass 1 for ``--reuse`` sources: the values of one committed file's rows under this run's keys.
    A run asking for ``embeddings`` takes a file's scores only if the file holds those columns: a
    source written without them cannot serve it, and its pairs are scored again (counted)."""
    from ..storage import locate
    from ..vectors import to_bytes, wanted_columns

    offered = {"score": 0, "caption": 0, "label": 0}
    lacking = 0
    for item in items.to_pylist():
        location = locate(item["uri"])
        parquet = pq.ParquetFile(item["path"], filesystem=location.filesystem)
        names = set(parquet.schema_arrow.names)
        sides = [s for s in json.loads(item["sides"]) if digests.get(s)]
        wanted = {K.IMAGE_SHA256, K.TEXT_SHA256, "status"} | set(SCORE_VALUES) | set(CAPTION_VALUES)
        if not wanted <= names:
            continue  # written before keys and provenance existed: matches nothing
        vectors = wanted_columns(embeddings)
        if "score" in sides and not set(vectors) <= names:
            sides = [s for s in sides if s != "score"]
            lacking += 1
        label_columns = set()
        if "label" in sides:
            label_set = _label_set(labels)
            label_columns = {*S.LABEL_COLUMNS, label_set.column} if label_set.column else set(S.LABEL_COLUMNS)
            if not label_columns <= names:
                sides = [s for s in sides if s != "label"]  # its labels cannot be keyed here
                label_columns = set()
        table = parquet.read(columns=sorted(wanted | ({"evidence"} & names) | label_columns | set(vectors)))
        for name, carried in ((S.IMAGE_EMBEDDING, S.IMAGE_EMBEDDING_BYTES), (S.TEXT_EMBEDDING, S.TEXT_EMBEDDING_BYTES)):
            if name in vectors and name in table.column_names:
                table = table.append_column(carried, to_bytes(table.column(name)))
        for side in sides:
            if side == "label":
                ok = pc.and_(pc.equal(table.column("status"), S.STATUS_OK), table.column("labels").is_valid())
                rows = table.filter(pc.fill_null(ok, False))
                tokens = _category_tokens(label_set, rows, rows.column(K.TEXT_SHA256))
                key = K.label_keys(digests["label"], rows.column(K.IMAGE_SHA256), tokens)
                values = [rows.column(f.name).cast(f.type) for f in LABEL_VALUE_FIELDS]
            elif side == "score":
                ok = pc.and_(pc.equal(table.column("status"), S.STATUS_OK), table.column("itc_score").is_valid())
                rows = table.filter(pc.fill_null(ok, False))
                key = K.score_keys(digests["score"], rows.column(K.IMAGE_SHA256), rows.column(K.TEXT_SHA256))
                values = [rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
                          for f in SCORE_VALUE_FIELDS]
            else:
                rows = table.filter(table.column("caption").is_valid())
                key = K.caption_keys(digests["caption"], rows.column(K.IMAGE_SHA256))
                values = [rows.column(f.name).cast(f.type) for f in CAPTION_VALUE_FIELDS]
            out = pa.Table.from_arrays(
                [key, *values, pa.array(np.full(rows.num_rows, item["priority"], dtype=np.int64))],
                schema=pa.schema([pa.field(KEY, pa.string()), *VALUE_FIELDS[side], pa.field(PRIO, pa.int64())]),
            ).filter(key.is_valid())
            _bucketed(work_fs, work, SIDES[side][1], f"s{item['priority']:04d}-f{item['index']:06d}", out, buckets)
            offered[side] += out.num_rows
    counts = {"offered_scores": [offered["score"]], "offered_captions": [offered["caption"]],
              "files_without_embeddings": [lacking]}
    if digests.get("label"):  # --labels
        counts["offered_labels"] = [offered["label"]]
    return pa.table(counts)


def _first_per_key(table: pa.Table, order: list[tuple[str, str]]) -> pa.Table:
    """One row per key: the first in ``order`` (after the key)."""
    if not table.num_rows:
        return table
    table = table.sort_by([(KEY, "ascending"), *order])
    keys = table.column(KEY).to_numpy(zero_copy_only=False)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return table.filter(pa.array(first))


def plan_bucket(items: pa.Table, *, work_fs, work: str) -> pa.Table:
    """Pass 2: per key, a reused value, or the one position whose row computes it."""
    counts = {f"{kind}_{_PLURAL[side]}": 0 for side in SIDES for kind in ("unique", "todo")}
    counts.update({f"reused_{side}_keys": 0 for side in SIDES})
    for item in items.to_pylist():
        side, bucket = item["side"], f"b{item['bucket']:05d}"
        keyed_dir, reuse_dir, plan_dir, value_dir, _ = SIDES[side]
        keyed = _read_dir(work_fs, f"{work}/{keyed_dir}/{bucket}", KEY_POS_SCHEMA)
        offered_schema = pa.schema([pa.field(KEY, pa.string()), *VALUE_FIELDS[side], pa.field(PRIO, pa.int64())])
        offered = _read_dir(work_fs, f"{work}/{reuse_dir}/{bucket}", offered_schema)
        grouped = keyed.group_by(KEY).aggregate([(POS, "min")])
        unique = pa.table({KEY: grouped.column(KEY), POS: grouped.column(f"{POS}_min")})
        if offered.num_rows and unique.num_rows:
            offered = offered.filter(pc.is_in(offered.column(KEY), value_set=unique.column(KEY)))
            reused = _first_per_key(offered, [(PRIO, "ascending")]).drop_columns([PRIO])
        else:
            reused = offered.drop_columns([PRIO]).slice(0, 0)
        if reused.num_rows:
            _write(work_fs, f"{work}/{value_dir}/{bucket}/reused.parquet", reused.append_column(REP, pa.nulls(reused.num_rows, pa.int64())))
        todo = unique.filter(pc.invert(pc.is_in(unique.column(KEY), value_set=reused.column(KEY)))) if reused.num_rows else unique
        _write(work_fs, f"{work}/{plan_dir}/{bucket}.parquet", todo.sort_by(POS))
        counts[f"unique_{_PLURAL[side]}"] += unique.num_rows
        counts[f"reused_{side}_keys"] += reused.num_rows
        counts[f"todo_{_PLURAL[side]}"] += todo.num_rows
    return pa.table({k: [v] for k, v in counts.items()})


def _unit_range(unit: int) -> tuple[int, int]:
    return unit << 32, (unit + 1) << 32


def _rows_to_compute(work_fs, work: str, unit: int, buckets: int, sides: list[str]) -> dict[str, np.ndarray]:
    lo, hi = _unit_range(unit)
    found = {}
    in_unit = (pc.field(POS) >= lo) & (pc.field(POS) < hi)
    for side in sides:
        plan_dir = SIDES[side][2]
        files = [f"{work}/{plan_dir}/b{b:05d}.parquet" for b in range(buckets)]
        present = [i.path for i in work_fs.get_file_info(files) if i.type == pafs.FileType.File]
        if present:
            table = pads.dataset(present, filesystem=work_fs, format="parquet", schema=KEY_POS_SCHEMA).to_table(filter=in_unit)
            found[side] = (table.column(POS).to_numpy() & 0xFFFFFFFF).astype(np.int64)
        else:
            found[side] = np.zeros(0, dtype=np.int64)
    return found


def _unit_keys(work_fs, work: str, unit: int) -> pa.Table:
    return _read_dir(work_fs, f"{work}/keys/u{unit:06d}", KEYS_FILE_SCHEMA).sort_by(ROW)


def _ranges(rows: np.ndarray) -> list[list[int]]:
    if not len(rows):
        return []
    rows = np.unique(rows)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [[int(rows[s]), int(rows[e - 1]) + 1] for s, e in zip(starts, ends)]


def compute_rows(
    items: pa.Table, *, filesystem, schema, batch_rows: int, work_fs, work: str, buckets: int, sides: list[str],
):
    """Pass 3's read: per unit, only the rows whose model call some key needs, and the rows with no
    score key (a missing image or a blank text), flagged with what each must compute."""
    for item in items.to_pylist():
        unit = item["unit"]
        planned = _rows_to_compute(work_fs, work, unit, buckets, sides)
        unit_keys = _unit_keys(work_fs, work, unit)
        keyless = unit_keys.filter(unit_keys.column(SKEY).is_null()).column(ROW).to_numpy()
        score_rows = planned.get("score", np.zeros(0, dtype=np.int64))
        caption_rows = planned.get("caption", np.zeros(0, dtype=np.int64))
        label_rows = planned.get("label", np.zeros(0, dtype=np.int64))
        wanted = np.concatenate([score_rows, caption_rows, label_rows, keyless])
        if not len(wanted):
            continue
        reading = dict(item, ranges=json.dumps(_ranges(wanted)))
        for table in read_units(pa.Table.from_pylist([reading]), filesystem=filesystem, schema=schema, batch_rows=batch_rows):
            rows = table.column(ROW).to_numpy()
            index = np.searchsorted(unit_keys.column(ROW).to_numpy(), rows)
            picked = unit_keys.take(pa.array(index))
            yield (
                table.append_column(SKEY, picked.column(SKEY))
                .append_column(CKEY, picked.column(CKEY))
                .append_column(K.IMAGE_SHA256, picked.column(K.IMAGE_SHA256))
                .append_column(K.TEXT_SHA256, picked.column(K.TEXT_SHA256))
                .append_column(DO_SCORE, pa.array(np.isin(rows, score_rows)))
                .append_column(DO_CAPTION, pa.array(np.isin(rows, caption_rows)))
                .append_column(LKEY, picked.column(LKEY))
                .append_column(DO_LABEL, pa.array(np.isin(rows, label_rows)))
            )


def only_needed_pixels(batch: pa.Table) -> pa.Table:
    """After decoding: a row keeps the pixels (or, with --decode-device gpu, the JPEG bytes) of the
    models it is to be computed by, and no others."""
    for column, flag in ((S.PIXELS_SCORE, DO_SCORE), (S.PIXELS_CAPTION, DO_CAPTION), (S.JPEG_SCORE, DO_SCORE), (S.JPEG_CAPTION, DO_CAPTION)):
        if column in batch.column_names:
            keep = batch.column(flag).to_numpy(zero_copy_only=False)
            if flag == DO_SCORE and DO_LABEL in batch.column_names:  # labels come from the scoring pass
                keep = keep | batch.column(DO_LABEL).to_numpy(zero_copy_only=False)
            values = batch.column(column)
            nulls = pa.nulls(len(values), values.type)
            batch = batch.set_column(batch.column_names.index(column), column, pc.if_else(pa.array(keep), values, nulls))
    return batch


DIRECT_SCHEMA = pa.schema([pa.field(POS, pa.int64()), pa.field(S.IMAGE_ERROR, pa.string()), pa.field("text_truncated", pa.bool_())])


def store_results(batch: pa.Table, *, run_id: str, work_fs, work: str, buckets: int) -> pa.Table:
    """Pass 3's end: each computed value under its key; rows with no key by position."""
    if not batch.num_rows:
        return pa.table({"pairs_scored": [0], "images_captioned": [0], "evidence_s": [0.0], "labels_computed": [0]})
    pos = positions(batch.column(UNIT).to_numpy(), batch.column(ROW).to_numpy())
    name = f"u{int(pos[0] >> 32):06d}-r{int(pos[0] & 0xFFFFFFFF):010d}-{uuid.uuid4().hex[:8]}"
    n = batch.num_rows
    now = datetime.now(timezone.utc)
    do_score = batch.column(DO_SCORE).to_numpy(zero_copy_only=False)
    if "itc_score" not in batch.column_names:  # the plan needed no scores: the stage did not run
        do_score &= False
        batch = batch.append_column("itc_score", pa.nulls(n, pa.float32())).append_column(
            "itm_score", pa.nulls(n, pa.float32())).append_column("text_truncated", pa.nulls(n, pa.bool_()))
    scored = batch.column("itc_score").is_valid().to_numpy(zero_copy_only=False)
    score_values = pa.table({
        KEY: batch.column(SKEY),
        "itc_score": batch.column("itc_score"), "itm_score": batch.column("itm_score"),
        "text_truncated": batch.column("text_truncated"),
        "scored_at": pa.array([now if s else None for s in scored], _TS),
        "scores_from_run": pa.array([run_id if s else None for s in scored], pa.string()),
        S.IMAGE_ERROR: batch.column(S.IMAGE_ERROR),
        "evidence": batch.column("evidence") if "evidence" in batch.column_names else pa.nulls(n, S.EVIDENCE_TYPE),
        **_embedding_bytes(batch),
        REP: pa.array(pos),
    }).filter(pa.array(do_score))
    evidence_s = float(pc.sum(batch.column(S.EVIDENCE_SECONDS)).as_py() or 0.0) if S.EVIDENCE_SECONDS in batch.column_names else 0.0
    _bucketed(work_fs, work, "sval", f"c-{name}", score_values, buckets)
    captions = 0
    if "caption" in batch.column_names:
        do_caption = batch.column(DO_CAPTION).to_numpy(zero_copy_only=False)
        captioned = batch.column("caption").is_valid().to_numpy(zero_copy_only=False)
        caption_values = pa.table({
            KEY: batch.column(CKEY), "caption": batch.column("caption"),
            "caption_from_run": pa.array([run_id if c else None for c in captioned], pa.string()),
            REP: pa.array(pos),
        }).filter(pa.array(do_caption))
        _bucketed(work_fs, work, "cval", f"c-{name}", caption_values, buckets)
        captions = int((do_caption & captioned).sum())
    labels_computed = 0
    if DO_LABEL in batch.column_names and "labels" in batch.column_names:
        do_label = batch.column(DO_LABEL).to_numpy(zero_copy_only=False)
        label_values = pa.table(
            {KEY: batch.column(LKEY), **{f.name: batch.column(f.name) for f in LABEL_VALUE_FIELDS}, REP: pa.array(pos)}
        ).filter(pa.array(do_label))
        _bucketed(work_fs, work, "lval", f"c-{name}", label_values, buckets)
        labels_computed = int((do_label & batch.column("labels").is_valid().to_numpy(zero_copy_only=False)).sum())
    keyless = batch.column(SKEY).is_null().to_numpy(zero_copy_only=False)
    if keyless.any():
        direct = pa.Table.from_arrays(
            [pa.array(pos), batch.column(S.IMAGE_ERROR), batch.column("text_truncated")], schema=DIRECT_SCHEMA
        )
        units = pos >> 32  # a batch may hold rows of several units
        for unit in np.unique(units[keyless]):
            _write(work_fs, f"{work}/direct/u{unit:06d}/{name}.parquet", direct.filter(pa.array(keyless & (units == unit))))
    return pa.table({"pairs_scored": [int((do_score & scored).sum())], "images_captioned": [captions], "evidence_s": [evidence_s],
                     "labels_computed": [labels_computed]})


def _embedding_bytes(batch: pa.Table) -> dict:
    """The score stage's embedding columns (``--embeddings``) as the plan's float16 bytes; null without."""
    from ..vectors import to_bytes

    out = {}
    for name, carried in ((S.IMAGE_EMBEDDING, S.IMAGE_EMBEDDING_BYTES), (S.TEXT_EMBEDDING, S.TEXT_EMBEDDING_BYTES)):
        out[carried] = to_bytes(batch.column(name)) if name in batch.column_names else pa.nulls(batch.num_rows, pa.binary())
    return out


def _value_schema(side: str) -> pa.Schema:
    return pa.schema([pa.field(KEY, pa.string()), *VALUE_FIELDS[side], pa.field(REP, pa.int64())])


def distribute_bucket(items: pa.Table, *, work_fs, work: str) -> pa.Table:
    """Pass 4: every position of a key gets the key's value, written per unit."""
    counts = {f"rows_{_PLURAL[side]}_reused": 0 for side in SIDES}
    counts.update({_DUPLICATES[side]: 0 for side in SIDES})
    for item in items.to_pylist():
        side, bucket = item["side"], f"b{item['bucket']:05d}"
        keyed_dir, _, _, value_dir, dist_dir = SIDES[side]
        keyed = _read_dir(work_fs, f"{work}/{keyed_dir}/{bucket}", KEY_POS_SCHEMA)
        values = _read_dir(work_fs, f"{work}/{value_dir}/{bucket}", _value_schema(side))
        if not keyed.num_rows:
            continue
        # Acero joins no struct or list columns (the evidence): join on the key and a value index, then take.
        index = pa.table({KEY: values.column(KEY), "__value": pa.array(np.arange(values.num_rows, dtype=np.int64))})
        matched = keyed.join(index, KEY, join_type="inner")
        taken = values.drop_columns([KEY]).take(matched.column("__value"))
        joined = pa.Table.from_arrays(
            [matched.column(POS), *taken.columns], names=[POS, *taken.column_names]
        )
        rep = joined.column(REP)
        reused = rep.is_null().to_numpy(zero_copy_only=False)
        duplicate = ~reused & (pc.fill_null(pc.not_equal(rep, joined.column(POS)), False).to_numpy(zero_copy_only=False))
        counts[f"rows_{_PLURAL[side]}_reused"] += int(reused.sum())
        counts[_DUPLICATES[side]] += int(duplicate.sum())
        joined = joined.drop_columns([REP])
        units = joined.column(POS).to_numpy() >> 32
        for unit in np.unique(units):
            _write(work_fs, f"{work}/{dist_dir}/u{unit:06d}/{bucket}.parquet", joined.filter(pa.array(units == unit)))
    return pa.table({k: [v] for k, v in counts.items()})


def _dist_schema(side: str) -> pa.Schema:
    return pa.schema([pa.field(POS, pa.int64()), *VALUE_FIELDS[side]])


def _align(pos: np.ndarray, table: pa.Table, fields) -> list[pa.Array]:
    """``table``'s columns (``fields``) at positions ``pos``; null where it has no row for one."""
    table = table.sort_by(POS)
    have = table.column(POS).to_numpy()
    index = np.searchsorted(have, pos)
    found = (index < len(have)) & (have[np.minimum(index, max(len(have) - 1, 0))] == pos) if len(have) else np.zeros(len(pos), bool)
    take = pa.array(np.where(found, index, 0), mask=~found) if len(have) else None
    out = []
    for field in fields:
        if take is None:
            out.append(pa.nulls(len(pos), field.type))
        else:
            out.append(table.column(field.name).take(take).combine_chunks().cast(field.type))
    return out


def assemble_unit(
    items: pa.Table, *, filesystem, schema, batch_rows: int, text_column: str, captioning: bool, work_fs, work: str,
    detect_language: bool = False, labelling: bool = False,
):
    """Pass 5: the unit's rows without image bytes, with their values in row order, ready for flags."""
    for item in items.to_pylist():
        unit = item["unit"]
        unit_keys = _unit_keys(work_fs, work, unit)
        scores = _read_dir(work_fs, f"{work}/sdist/u{unit:06d}", _dist_schema("score"))
        captions = _read_dir(work_fs, f"{work}/cdist/u{unit:06d}", _dist_schema("caption")) if captioning else None
        direct = _read_dir(work_fs, f"{work}/direct/u{unit:06d}", DIRECT_SCHEMA)
        labels = _read_dir(work_fs, f"{work}/ldist/u{unit:06d}", _dist_schema("label")) if labelling else None
        for table in read_units(pa.Table.from_pylist([item]), filesystem=filesystem, schema=schema, batch_rows=batch_rows):
            rows = table.column(ROW).to_numpy()
            pos = positions(table.column(UNIT).to_numpy(), rows)
            index = np.searchsorted(unit_keys.column(ROW).to_numpy(), rows)
            picked = unit_keys.take(pa.array(index))
            itc, itm, truncated, scored_at, from_run, image_error, evidence, image_vec, text_vec = _align(
                pos, scores, SCORE_VALUE_FIELDS)
            direct_error, direct_truncated = _align(pos, direct, list(DIRECT_SCHEMA)[1:])
            keyless = picked.column(SKEY).is_null()
            direct_found = _align(pos, direct.append_column("__found", pa.array(np.ones(direct.num_rows, bool))),
                                  [pa.field("__found", pa.bool_())])[0]
            lost = pc.or_(
                pc.and_(pc.invert(keyless), pc.and_(itc.is_null(), image_error.is_null())),
                pc.and_(keyless, direct_found.is_null()),
            )
            if pc.any(lost).as_py():
                # A key whose value no pass wrote: a lost file or a bug, never a row to commit without scores.
                raise RuntimeError(f"unit {unit}: {pc.sum(lost).as_py()} keyed rows have no value in the plan's results")
            image_error = pc.if_else(keyless, direct_error, image_error)
            truncated = pc.if_else(keyless, direct_truncated, truncated)
            texts = table.column(text_column).to_pylist()
            text_error = pa.array(
                [text_problem(t) for t in texts], pa.string()
            )
            now = datetime.now(timezone.utc)
            scored_at = pc.fill_null(scored_at, pa.scalar(now, _TS))
            out = (
                table.append_column(K.IMAGE_SHA256, picked.column(K.IMAGE_SHA256))
                .append_column(K.TEXT_SHA256, picked.column(K.TEXT_SHA256))
                .append_column(S.IMAGE_ERROR, image_error)
                .append_column(S.TEXT_ERROR, text_error)
                .append_column("itc_score", itc)
                .append_column("itm_score", itm)
                .append_column("text_truncated", pc.fill_null(truncated, False))
                .append_column("scored_at", scored_at)
                .append_column("scores_from_run", from_run)
                .append_column("evidence", evidence)
                .append_column(S.IMAGE_EMBEDDING_BYTES, image_vec)
                .append_column(S.TEXT_EMBEDDING_BYTES, text_vec)
            )
            if detect_language:  # per row, from its text: cheap, and never shared between rows
                from blip_ops.language import detect_languages

                usable = [t if e is None else None for t, e in zip(texts, text_error.to_pylist())]
                out = out.append_column(S.TEXT_LANGUAGE, pa.array(detect_languages(usable), pa.string()))
            if labelling:
                for field, values in zip(LABEL_VALUE_FIELDS, _align(pos, labels, LABEL_VALUE_FIELDS)):
                    out = out.append_column(field.name, values)
            if captioning:
                caption, caption_from = _align(pos, captions, CAPTION_VALUE_FIELDS)
                out = out.append_column("caption", caption).append_column("caption_from_run", caption_from)
            yield out
