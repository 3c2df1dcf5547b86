"""Near-duplicate image groups (``--near-duplicates``) over a run's written pieces, without an
all-pairs comparison and without gathering embeddings on the driver.

A group is a connected component of "same ``image_sha256``" or "image-embedding cosine >= T". The
unit of work is a unique image (its SHA-256), so exact copies cost nothing; near copies are found
by random-hyperplane (SimHash) signatures cut into ``bands`` bands of ``bits`` bits: two images
whose embeddings are at angle theta agree on a bit with probability ``p = 1 - theta / pi`` and
share some band with probability ``1 - (1 - p^bits)^bands``. Every candidate is then checked by
its true cosine, so precision is 1 by construction; ``banding`` picks ``bits`` from the run's size
(about log2 of its rows, so an unrelated pair rarely shares a band and candidates grow about
linearly) and ``bands`` so that a pair exactly at T is found with probability ``RECALL_AT_T``
(pairs above T, which planted copies mostly are, are found more surely still).

The passes are the keyed plan's kind (``pipelines.reuse.passes``): plain Ray tasks over small files
in a work directory, each holding one bucket (an image bucket: the images whose 64-bit SHA-256
prefix falls in it; or a band bucket: the band keys that fall in it), never the whole run:

1. ``piece_images`` (per piece): its unique images, row counts and first embedding, by image bucket.
2. ``image_bucket`` (per image bucket): one node per image; its band keys, by band bucket.
3. ``band_bucket`` (per band bucket): every pair of nodes sharing a band key, by the first node's bucket.
4. ``attach_first`` (per image bucket): each candidate once, with its first node's embedding, by the second's bucket.
5. ``check_pairs`` (per image bucket): the second node's embedding, the true cosine, the edges >= T.
6. On the driver, ``components``: union-find over the edges only (image hashes and row counts, never
   an embedding); each member's group (its component's smallest hash) and size, by image bucket.
7. ``assign_bucket`` (per image bucket): every image's group (its own hash when it has no edge) and
   size, per piece that holds it.
8. ``rewrite_piece`` (per piece): the piece again, with ``image_group`` and ``image_group_size``.

A group follows content: the hyperplanes come from a fixed seed, a node's embedding is the first of
its image's rows in piece order, and a group is named by its smallest hash, so the same catalog
gives the same groups whatever the order its rows were written in.
"""

from __future__ import annotations

import math
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import keys as K
from .. import schema as S
from ..reuse.passes import _read_dir, _write

# Images a bucket task holds at once: 250,000 x 512 bytes of float16 embeddings (D = 256) is 128 MB.
IMAGES_PER_BUCKET = int(os.environ.get("BLIP_MODERATE_IMAGES_PER_BUCKET", 250_000))
# A pair exactly at the threshold is found with at least this probability (pairs above it, more surely).
RECALL_AT_T = 0.995
# Candidates given their embedding at once in pass 4: 500,000 x about 600 bytes is 300 MB.
CHUNK_PAIRS = int(os.environ.get("BLIP_MODERATE_NEARDUP_CHUNK_PAIRS", 500_000))
SEED = 20261206  # the hyperplanes' seed: part of what makes the groups the same run after run
NODE = "__node"
PIECE = "__piece"
EMB = "__emb"
ROWS = "__rows"

NODE_SCHEMA = pa.schema([pa.field(NODE, pa.int64()), pa.field(K.IMAGE_SHA256, pa.string()), pa.field(ROWS, pa.int64()),
                         pa.field(PIECE, pa.int32()), pa.field(EMB, pa.binary())])
BAND_SCHEMA = pa.schema([pa.field("key", pa.int64()), pa.field(NODE, pa.int64())])
PAIR_SCHEMA = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64())])
HALF_SCHEMA = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64()), pa.field("sha_a", pa.string()),
                         pa.field("rows_a", pa.int64()), pa.field("emb_a", pa.binary())])
EDGE_SCHEMA = pa.schema([pa.field("sha_a", pa.string()), pa.field("rows_a", pa.int64()), pa.field("sha_b", pa.string()),
                         pa.field("rows_b", pa.int64()), pa.field("cosine", pa.float32())])
MEMBER_SCHEMA = pa.schema([pa.field(K.IMAGE_SHA256, pa.string()), pa.field(S.IMAGE_GROUP, pa.string()),
                           pa.field(S.IMAGE_GROUP_SIZE, pa.int32())])


def banding(rows: int, threshold: float) -> tuple[int, int]:
    """(bits per band, bands) for a run of ``rows`` rows at cosine ``threshold``.

    ``bits`` about log2(rows) (12 to 28): an unrelated pair (cosine near 0, p = 1/2) then shares a
    given band with probability about 1/rows, so the expected candidates from unrelated pairs stay
    about ``rows * bands / 2``, linear in rows. ``bands`` the fewest for ``RECALL_AT_T`` at T:
    at T = 0.95 (p = 0.899), 200,000 rows give 18 bits and 34 bands; 50 million, 26 bits and 82."""
    bits = int(min(28, max(12, math.ceil(math.log2(max(rows, 2))))))
    p = 1.0 - math.acos(max(-1.0, min(1.0, threshold))) / math.pi
    hit = p ** bits
    bands = 1 if hit >= 1.0 else int(math.ceil(math.log(1.0 - RECALL_AT_T) / math.log(1.0 - hit)))
    return bits, max(1, bands)


def bucket_count(rows: int) -> int:
    return max(1, math.ceil(rows / IMAGES_PER_BUCKET))


def node_ids(shas) -> np.ndarray:
    """A 63-bit id per image hash (its first 15 hex digits): buckets and pair keys without strings."""
    return np.array([int(h[:15], 16) for h in shas], dtype=np.int64)


def hyperplanes(dim: int, count: int) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((dim, count)).astype(np.float32)


def band_keys(vectors: np.ndarray, bits: int, bands: int) -> np.ndarray:
    """``(n, bands)`` int64 keys: band index and its ``bits`` sign bits, mixed into one 64-bit value."""
    planes = hyperplanes(vectors.shape[1], bits * bands)
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))
    values = np.empty((len(vectors), bands), dtype=np.int64)
    for start in range(0, len(vectors), 8192):  # a block at a time: 8,192 x 2,132 projections is 70 MB
        signs = (vectors[start:start + 8192].astype(np.float32) @ planes) >= 0
        values[start:start + 8192] = (signs.reshape(-1, bands, bits) * weights).sum(axis=2, dtype=np.int64)
    # Band index in the high bits: the same bit pattern in two bands is two keys.
    return (np.arange(bands, dtype=np.int64)[None, :] << np.int64(32)) | values


def _mix(keys: np.ndarray) -> np.ndarray:
    """A well-spread hash of int64 keys (splitmix64's finaliser) for choosing band buckets."""
    x = keys.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _emb_matrix(column, dim: int) -> np.ndarray:
    """A binary column of float16 vectors (none null, each ``2 * dim`` bytes) as an ``(n, dim)``
    float16 view of its Arrow buffer: no Python object per row, no copy (float32 only per block, in ``_cosines``)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if not n:
        return np.zeros((0, dim), dtype=np.float16)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=column.offset * 4)
    if column.null_count or not np.all(np.diff(offsets) == 2 * dim):
        raise ValueError(f"embeddings are not all {dim} float16 values")
    return np.frombuffer(column.buffers()[2], dtype=np.float16, count=n * dim, offset=int(offsets[0])).reshape(n, dim)


def _cosines(a: np.ndarray, b: np.ndarray, block: int = 65_536) -> np.ndarray:
    """Row-wise cosine of two float16 matrices, in float32 a block at a time (memory: one block)."""
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), block):
        x = _unit(a[start:start + block].astype(np.float32))
        y = _unit(b[start:start + block].astype(np.float32))
        out[start:start + block] = (x * y).sum(axis=1)
    return out


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


# ---------------------------------------------------------------------------------------------
# The passes (plain pyarrow and numpy; ``group_near_duplicates`` runs them as Ray tasks)


def piece_images(items: pa.Table, *, fs, work: str, buckets: int) -> pa.Table:
    """Pass 1 for one piece: its unique images (row counts, first embedding), into their image buckets."""
    from ..vectors import to_bytes

    item = items.to_pylist()[0]
    path, piece = item["path"], int(item["piece"])
    names = pq.read_schema(path, filesystem=fs).names
    columns = [K.IMAGE_SHA256] + ([S.IMAGE_EMBEDDING] if S.IMAGE_EMBEDDING in names else [])
    table = pq.read_table(path, columns=columns, filesystem=fs)
    table = table.filter(table.column(K.IMAGE_SHA256).is_valid())
    if not table.num_rows:
        return pa.table({"rows": [0]})
    emb = to_bytes(table.column(S.IMAGE_EMBEDDING)) if S.IMAGE_EMBEDDING in columns else pa.nulls(table.num_rows, pa.binary())
    shas = table.column(K.IMAGE_SHA256).to_pylist()
    first, rows, vectors = {}, {}, {}
    for sha, vector in zip(shas, emb.to_pylist()):
        rows[sha] = rows.get(sha, 0) + 1
        if vector is not None and sha not in vectors:
            vectors[sha] = vector
        first.setdefault(sha, None)
    unique = list(first)
    nodes = node_ids(unique)
    out = pa.Table.from_arrays([
        pa.array(nodes), pa.array(unique, pa.string()), pa.array([rows[s] for s in unique], pa.int64()),
        pa.array(np.full(len(unique), piece, dtype=np.int32)), pa.array([vectors.get(s) for s in unique], pa.binary()),
    ], schema=NODE_SCHEMA)
    which = nodes % buckets
    for bucket in np.unique(which):
        _write(fs, f"{work}/img/b{bucket:05d}/p{piece:06d}.parquet", out.filter(pa.array(which == bucket)))
    return pa.table({"rows": [table.num_rows]})


def _nodes(fs, work: str, bucket: int) -> pa.Table:
    """The bucket's images, one row each: rows summed over pieces, the embedding of the first piece holding one."""
    table = _read_dir(fs, f"{work}/img/b{bucket:05d}", NODE_SCHEMA)
    if not table.num_rows:
        return table
    rows = table.group_by(NODE).aggregate([(ROWS, "sum")])
    with_emb = table.filter(table.column(EMB).is_valid()).sort_by([(NODE, "ascending"), (PIECE, "ascending")])
    keep = np.ones(with_emb.num_rows, dtype=bool)
    ids = with_emb.column(NODE).to_numpy()
    keep[1:] = ids[1:] != ids[:-1]
    with_emb = with_emb.filter(pa.array(keep)).select([NODE, EMB])
    names = table.group_by(NODE).aggregate([(K.IMAGE_SHA256, "min")])
    nodes = names.join(rows, NODE).join(with_emb, NODE, join_type="left outer")
    return pa.table({NODE: nodes.column(NODE), K.IMAGE_SHA256: nodes.column(f"{K.IMAGE_SHA256}_min"),
                     ROWS: nodes.column(f"{ROWS}_sum"), EMB: nodes.column(EMB)}).sort_by(NODE)


def image_bucket(items: pa.Table, *, fs, work: str, buckets: int, dim: int, bits: int, bands: int) -> pa.Table:
    """Pass 2 for one image bucket: its nodes (kept for passes 4, 5 and 7) and their band keys."""
    bucket = int(items.column("bucket")[0].as_py())
    nodes = _nodes(fs, work, bucket)
    _write(fs, f"{work}/nodes/b{bucket:05d}.parquet", nodes if nodes.num_rows else
           pa.schema([NODE_SCHEMA.field(n) for n in (NODE, K.IMAGE_SHA256, ROWS, EMB)]).empty_table())
    embedded = nodes.filter(nodes.column(EMB).is_valid()) if nodes.num_rows else nodes
    if not embedded.num_rows:
        return pa.table({"images": [nodes.num_rows], "embedded": [0]})
    keys = band_keys(_emb_matrix(embedded.column(EMB), dim), bits, bands)
    flat_keys = keys.reshape(-1)
    flat_nodes = np.repeat(embedded.column(NODE).to_numpy(), bands)
    which = (_mix(flat_keys) % np.uint64(buckets)).astype(np.int64)
    for target in np.unique(which):
        chosen = which == target
        _write(fs, f"{work}/band/b{target:05d}/i{bucket:05d}.parquet",
               pa.Table.from_arrays([pa.array(flat_keys[chosen]), pa.array(flat_nodes[chosen])], schema=BAND_SCHEMA))
    return pa.table({"images": [nodes.num_rows], "embedded": [embedded.num_rows]})


def band_bucket(items: pa.Table, *, fs, work: str, buckets: int) -> pa.Table:
    """Pass 3 for one band bucket: every pair of nodes sharing a band key (a < b), by a's image bucket."""
    bucket = int(items.column("bucket")[0].as_py())
    table = _read_dir(fs, f"{work}/band/b{bucket:05d}", BAND_SCHEMA)
    if not table.num_rows:
        return pa.table({"band_pairs": [0], "largest_band_group": [0]})
    order = np.lexsort((table.column(NODE).to_numpy(), table.column("key").to_numpy()))
    keys, nodes = table.column("key").to_numpy()[order], table.column(NODE).to_numpy()[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(keys)]]))
    # A node has one key per band (the band is in the key), so a key's nodes are distinct, sorted.
    pairs_of_two = starts[sizes == 2]  # most shared keys: one pair each, without a Python loop
    first, second = [nodes[pairs_of_two]], [nodes[pairs_of_two + 1]]
    for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):
        members = nodes[start:start + size]
        i, j = np.triu_indices(len(members), k=1)
        first.append(members[i])
        second.append(members[j])
    if not sum(len(f) for f in first):
        first = []
    if not first:
        return pa.table({"band_pairs": [0], "largest_band_group": [int(sizes.max())]})
    a, b = np.concatenate(first), np.concatenate(second)
    which = a % buckets
    for target in np.unique(which):
        chosen = which == target
        _write(fs, f"{work}/cand/b{target:05d}/band{bucket:05d}.parquet",
               pa.Table.from_arrays([pa.array(a[chosen]), pa.array(b[chosen])], schema=PAIR_SCHEMA))
    return pa.table({"band_pairs": [len(a)], "largest_band_group": [int(sizes.max())]})


def _unique_pairs(table: pa.Table) -> pa.Table:
    return table.group_by(["a", "b"]).aggregate([]) if table.num_rows else table


def attach_first(items: pa.Table, *, fs, work: str, buckets: int) -> pa.Table:
    """Pass 4 for one image bucket: each candidate whose first node is here, once, with that node's
    hash, rows and embedding, into the second node's bucket (``CHUNK_PAIRS`` at a time, so the
    embeddings copied stay one chunk's whatever the bucket's candidates)."""
    bucket = int(items.column("bucket")[0].as_py())
    pairs = _unique_pairs(_read_dir(fs, f"{work}/cand/b{bucket:05d}", PAIR_SCHEMA))
    if not pairs.num_rows:
        return pa.table({"candidates": [0]})
    nodes = pq.read_table(f"{work}/nodes/b{bucket:05d}.parquet", filesystem=fs)
    index = pa.table({"a": nodes.column(NODE), "__i": pa.array(np.arange(nodes.num_rows, dtype=np.int64))})
    for chunk, start in enumerate(range(0, pairs.num_rows, CHUNK_PAIRS)):
        joined = pairs.slice(start, CHUNK_PAIRS).join(index, "a")
        taken = nodes.take(joined.column("__i"))
        half = pa.Table.from_arrays([joined.column("a"), joined.column("b"), taken.column(K.IMAGE_SHA256),
                                     taken.column(ROWS), taken.column(EMB)], schema=HALF_SCHEMA)
        which = half.column("b").to_numpy() % buckets
        for target in np.unique(which):
            _write(fs, f"{work}/half/b{target:05d}/i{bucket:05d}-c{chunk:05d}.parquet", half.filter(pa.array(which == target)))
    return pa.table({"candidates": [pairs.num_rows]})


def check_pairs(items: pa.Table, *, fs, work: str, dim: int, threshold: float) -> pa.Table:
    """Pass 5 for one image bucket: the true cosine of each candidate whose second node is here, one
    candidate file at a time; the pairs at or above the threshold are the edges (hashes and row counts only)."""
    bucket = int(items.column("bucket")[0].as_py())
    infos = fs.get_file_info(pafs.FileSelector(f"{work}/half/b{bucket:05d}", allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not files:
        return pa.table({"checked": [0], "edges": [0]})
    nodes = pq.read_table(f"{work}/nodes/b{bucket:05d}.parquet", filesystem=fs)
    index = pa.table({"b": nodes.column(NODE), "__i": pa.array(np.arange(nodes.num_rows, dtype=np.int64))})
    checked, found = 0, []
    for path in files:
        joined = pq.read_table(path, filesystem=fs, schema=HALF_SCHEMA).join(index, "b")
        taken = nodes.take(joined.column("__i"))
        cosine = _cosines(_emb_matrix(joined.column("emb_a"), dim), _emb_matrix(taken.column(EMB), dim))
        found.append(pa.Table.from_arrays([
            joined.column("sha_a"), joined.column("rows_a"), taken.column(K.IMAGE_SHA256), taken.column(ROWS),
            pa.array(cosine.astype(np.float32)),
        ], schema=EDGE_SCHEMA).filter(pa.array(cosine >= threshold)))
        checked += joined.num_rows
    edges = pa.concat_tables(found)
    if edges.num_rows:
        _write(fs, f"{work}/edges/b{bucket:05d}.parquet", edges)
    return pa.table({"checked": [checked], "edges": [edges.num_rows]})


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller hash is the root: a component is named by its smallest member whatever the edge order.
            low, high = (ra, rb) if ra < rb else (rb, ra)
            self.parent[high] = low
            self.parent.setdefault(low, low)


def components(edges: pa.Table) -> pa.Table:
    """Step 6, on the driver: union-find over the edge list alone (``EDGE_SCHEMA``, no embedding); each
    member image's group (its component's smallest hash) and the component's rows (``MEMBER_SCHEMA``)."""
    sets = _UnionFind()
    rows: dict[str, int] = {}
    for sha_a, rows_a, sha_b, rows_b in zip(*(edges.column(n).to_pylist() for n in ("sha_a", "rows_a", "sha_b", "rows_b"))):
        rows[sha_a], rows[sha_b] = rows_a, rows_b
        sets.union(sha_a, sha_b)
    roots = {sha: sets.find(sha) for sha in rows}
    sizes: dict[str, int] = {}
    for sha, root in roots.items():
        sizes[root] = sizes.get(root, 0) + rows[sha]
    members = sorted(roots)
    return pa.Table.from_arrays([
        pa.array(members, pa.string()), pa.array([roots[m] for m in members], pa.string()),
        pa.array([sizes[roots[m]] for m in members], pa.int32()),
    ], schema=MEMBER_SCHEMA)


def assign_bucket(items: pa.Table, *, fs, work: str) -> pa.Table:
    """Pass 7 for one image bucket: every image's group and size (its own hash and rows without an
    edge), written for each piece holding it."""
    bucket = int(items.column("bucket")[0].as_py())
    held = _read_dir(fs, f"{work}/img/b{bucket:05d}", NODE_SCHEMA)
    if not held.num_rows:
        return pa.table({"groups": [0]})
    nodes = pq.read_table(f"{work}/nodes/b{bucket:05d}.parquet", filesystem=fs, columns=[K.IMAGE_SHA256, ROWS])
    members = _read_dir(fs, f"{work}/members/b{bucket:05d}", MEMBER_SCHEMA)
    table = nodes.join(members, K.IMAGE_SHA256, join_type="left outer")
    group = pc.coalesce(table.column(S.IMAGE_GROUP), table.column(K.IMAGE_SHA256))
    size = pc.coalesce(table.column(S.IMAGE_GROUP_SIZE), table.column(ROWS).cast(pa.int32()))
    assigned = pa.table({K.IMAGE_SHA256: table.column(K.IMAGE_SHA256), S.IMAGE_GROUP: group, S.IMAGE_GROUP_SIZE: size})
    owners = held.select([K.IMAGE_SHA256, PIECE]).join(assigned, K.IMAGE_SHA256)
    pieces = owners.column(PIECE).to_numpy()
    for piece in np.unique(pieces):
        _write(fs, f"{work}/assign/p{piece:06d}/b{bucket:05d}.parquet",
               owners.filter(pa.array(pieces == piece)).select(MEMBER_SCHEMA.names).cast(MEMBER_SCHEMA))
    shared = int(pc.sum(pc.greater(size, table.column(ROWS).cast(pa.int32()))).as_py() or 0)
    return pa.table({"groups": [table.num_rows], "images_in_shared_groups": [shared]})


def rewrite_piece(items: pa.Table, *, fs, work: str) -> pa.Table:
    """Pass 8 for one piece: its rows with ``image_group`` and ``image_group_size`` (null without an image hash)."""
    item = items.to_pylist()[0]
    path, piece = item["path"], int(item["piece"])
    table = pq.read_table(path, filesystem=fs)
    assigned = _read_dir(fs, f"{work}/assign/p{piece:06d}", MEMBER_SCHEMA)
    lookup = dict(zip(assigned.column(K.IMAGE_SHA256).to_pylist(), zip(assigned.column(S.IMAGE_GROUP).to_pylist(),
                                                                    assigned.column(S.IMAGE_GROUP_SIZE).to_pylist())))
    found = [lookup.get(sha, (None, None)) for sha in table.column(K.IMAGE_SHA256).to_pylist()]
    for name, values, type_ in ((S.IMAGE_GROUP, [f[0] for f in found], pa.string()),
                                (S.IMAGE_GROUP_SIZE, [f[1] for f in found], pa.int32())):
        column = pa.array(values, type_)
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), pa.field(name, type_), column)
        else:
            table = table.append_column(pa.field(name, type_), column)
    _replace(fs, path, table)
    return pa.table({"rows": [table.num_rows]})


def _replace(fs, path: str, table: pa.Table) -> None:
    """Write ``table`` over ``path`` so a reader sees the old file or the new one, never half of one."""
    if isinstance(fs, pafs.LocalFileSystem):
        directory, name = path.rsplit("/", 1)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, filesystem=fs)
        fs.move(temporary, path)
    else:  # an object store's PUT replaces an object whole
        pq.write_table(table, path, filesystem=fs)


# ---------------------------------------------------------------------------------------------
# Orchestration


def group_near_duplicates(paths: list[str], fs, work: str, *, rows: int, dim: int, threshold: float) -> dict:
    """Every pass over the pieces at ``paths`` (on ``fs``), in ``work``; returns counts and seconds.
    The driver holds only task results (one row of counts each) and, for step 6, the edge list."""
    import time

    from .dedup import _sum, _tasks

    buckets = bucket_count(rows)
    bits, bands = banding(rows, threshold)
    common = {"fs": fs, "work": work}
    pieces = [{"path": path, "piece": index} for index, path in enumerate(paths)]
    bucket_items = [{"bucket": b} for b in range(buckets)]
    seconds, started = {}, time.perf_counter()

    def lap(name):
        nonlocal started
        now = time.perf_counter()
        seconds[name] = round(now - started, 3)
        started = now

    _tasks(pieces, piece_images, dict(common, buckets=buckets))
    lap("images")
    imaged = _sum(_tasks(bucket_items, image_bucket, dict(common, buckets=buckets, dim=dim, bits=bits, bands=bands)))
    lap("signatures")
    banded = _tasks(bucket_items, band_bucket, dict(common, buckets=buckets))
    lap("bands")
    candidates = _sum(_tasks(bucket_items, attach_first, dict(common, buckets=buckets)))
    checked = _sum(_tasks(bucket_items, check_pairs, dict(common, dim=dim, threshold=threshold)))
    lap("check")
    edges = _read_edges(fs, work, buckets)
    members = components(edges)
    which = node_ids(members.column(K.IMAGE_SHA256).to_pylist()) % buckets if members.num_rows else np.zeros(0, np.int64)
    for bucket in np.unique(which):
        _write(fs, f"{work}/members/b{bucket:05d}/driver.parquet", members.filter(pa.array(which == bucket)))
    lap("components")
    assigned = _sum(_tasks(bucket_items, assign_bucket, common))
    _tasks(pieces, rewrite_piece, common)
    lap("rewrite")
    largest = int(pc.max(banded.column("largest_band_group")).as_py() or 0) if banded.num_rows else 0
    return {
        "threshold": threshold, "bits": bits, "bands": bands, "buckets": buckets,
        "images": int(imaged.get("images", 0)), "images_embedded": int(imaged.get("embedded", 0)),
        "band_pairs": int(pc.sum(banded.column("band_pairs")).as_py() or 0) if banded.num_rows else 0,
        "largest_band_group": largest,
        "candidates": int(candidates.get("candidates", 0)), "edges": int(checked.get("edges", 0)),
        "images_in_shared_groups": int(assigned.get("images_in_shared_groups", 0)),
        "groups_shared": int(len(set(members.column(S.IMAGE_GROUP).to_pylist()))) if members.num_rows else 0,
        "seconds": seconds,
    }


def _read_edges(fs, work: str, buckets: int) -> pa.Table:
    files = [f"{work}/edges/b{b:05d}.parquet" for b in range(buckets)]
    present = [i.path for i in fs.get_file_info(files) if i.type == pafs.FileType.File]
    tables = [pq.read_table(p, filesystem=fs) for p in present]
    return pa.concat_tables(tables) if tables else EDGE_SCHEMA.empty_table()


def group_in_memory(shas: list, matrix: np.ndarray, valid: np.ndarray, threshold: float) -> tuple[list, list]:
    """(image_group, image_group_size) per row for rows already in one process (a notebook audit's
    sample, on the driver by design): the same bands, check and union-find as the passes, in memory."""
    counts: dict[str, int] = {}
    vectors_of: dict[str, np.ndarray] = {}
    for sha, vector, ok in zip(shas, matrix, valid):
        if sha is None:
            continue
        counts[sha] = counts.get(sha, 0) + 1
        if ok and sha not in vectors_of:
            vectors_of[sha] = vector
    embedded = sorted(vectors_of)
    edges = EDGE_SCHEMA.empty_table()
    if len(embedded) > 1:
        unit = _unit(np.array([vectors_of[s] for s in embedded], dtype=np.float32))
        bits, bands = banding(len(shas), threshold)
        keys = band_keys(unit, bits, bands)
        by_key: dict[int, list[int]] = {}
        for row, values in enumerate(keys):
            for key in values:
                by_key.setdefault(int(key), []).append(row)
        pairs = {(a, b) for members in by_key.values() for i, a in enumerate(members) for b in members[i + 1:]}
        kept = [(a, b, float(unit[a] @ unit[b])) for a, b in sorted(pairs)]
        kept = [(a, b, c) for a, b, c in kept if c >= threshold]
        edges = pa.Table.from_pylist([
            {"sha_a": embedded[a], "rows_a": counts[embedded[a]], "sha_b": embedded[b], "rows_b": counts[embedded[b]],
             "cosine": c} for a, b, c in kept], schema=EDGE_SCHEMA)
    members = components(edges)
    found = dict(zip(members.column(K.IMAGE_SHA256).to_pylist(),
                     zip(members.column(S.IMAGE_GROUP).to_pylist(), members.column(S.IMAGE_GROUP_SIZE).to_pylist())))
    groups = [None if s is None else found.get(s, (s, counts[s]))[0] for s in shas]
    sizes = [None if s is None else found.get(s, (s, counts[s]))[1] for s in shas]
    return groups, sizes


def brute_force_pairs(shas: list[str], vectors: np.ndarray, threshold: float) -> set[tuple[str, str]]:
    """Every pair of distinct images at cosine >= ``threshold``, by comparing all pairs (tests and
    benchmarks only: quadratic)."""
    unit = _unit(vectors.astype(np.float32))
    out = set()
    for start in range(0, len(unit), 2048):
        block = unit[start:start + 2048] @ unit.T
        i, j = np.nonzero(block >= threshold)
        for x, y in zip(i + start, j):
            if x < y and shas[x] != shas[y]:
                out.add((min(shas[x], shas[y]), max(shas[x], shas[y])))
    return out
