"""Near-duplicate groups on a planted synthetic catalog: recall and precision against brute force,
groups equal to brute force's components, stable across runs and piece order, and the driver
never holding an embedding. (Synthetic embeddings: the grouping stage only reads the column.)"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import keys as K
from pipelines import schema as S
from pipelines import vectors
from pipelines.dataflow import neardup

DIM = 32
T = 0.95


def _sha(i) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _planted(n_images=1200, seed=0):
    """Unrelated images, and families of near copies at cosines spread around T (some just below)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_images, DIM)).astype(np.float32)
    shas, vecs = [_sha(i) for i in range(n_images)], list(base)
    for family in range(150):
        origin = base[family]
        for copy in range(rng.integers(1, 4)):
            noise = rng.standard_normal(DIM).astype(np.float32)
            noise -= noise @ origin / (origin @ origin) * origin
            # cosine = 1 / sqrt(1 + s^2) for noise of norm s * |origin|: 0.93 to 0.995
            target = rng.uniform(0.93, 0.995)
            s = np.sqrt(1 / target ** 2 - 1)
            vecs.append(origin + noise / np.linalg.norm(noise) * np.linalg.norm(origin) * s)
            shas.append(_sha(f"copy-{family}-{copy}"))
    vecs = np.array(vecs, dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return shas, vecs.astype(np.float16)


def _rows(shas, vecs, seed=1):
    """Rows: every image once, some exact copies (the same sha again), one image with no embedding
    (unscored), rows without an image."""
    rng = np.random.default_rng(seed)
    index = list(range(len(shas))) + list(rng.integers(0, len(shas), 200))
    row_shas = [shas[i] for i in index] + [_sha("unscored"), None, None]
    matrix = np.concatenate([vecs[index], np.zeros((3, DIM), np.float16)])
    valid = np.array([True] * len(index) + [False] * 3)
    order = rng.permutation(len(row_shas))
    return [row_shas[i] for i in order], matrix[order], valid[order]


def _write_pieces(directory, row_shas, matrix, valid, pieces=5):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, part in enumerate(np.array_split(np.arange(len(row_shas)), pieces)):
        table = pa.table({
            "id": pa.array([f"r{i}" for i in part]),
            K.IMAGE_SHA256: pa.array([row_shas[i] for i in part], pa.string()),
            S.IMAGE_EMBEDDING: vectors.fixed_array(matrix[part], valid[part]),
        })
        path = str(directory / f"u000000-r{part[0]:010d}-n{len(part):06d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


def _components(shas, edges):
    parent = {s: s for s in shas}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in sorted(edges):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {s: find(s) for s in shas}


@pytest.fixture(scope="module")
def grouped(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("neardup")
    shas, vecs = _planted()
    row_shas, matrix, valid = _rows(shas, vecs)
    fs = pafs.LocalFileSystem()
    runs = []
    for name, reverse in (("first", False), ("again", True)):
        paths = _write_pieces(root / name, row_shas, matrix, valid)
        work = str(root / f"work-{name}")
        counts = neardup.group_near_duplicates(paths[::-1] if reverse else paths, fs, work, rows=len(row_shas), dim=DIM,
                                               threshold=T)
        edges = neardup._read_edges(fs, work, counts["buckets"])
        table = pa.concat_tables([pq.read_table(p) for p in paths])
        runs.append((counts, edges, table))
    return shas, vecs, row_shas, runs


def test_recall_and_precision_against_brute_force(grouped):
    shas, vecs, _, runs = grouped
    truth = neardup.brute_force_pairs(shas, vecs, T)
    counts, edges, _ = runs[0]
    found = {tuple(sorted(p)) for p in zip(edges.column("sha_a").to_pylist(), edges.column("sha_b").to_pylist())}
    assert len(truth) > 150  # planted families, so recall means something
    assert found <= truth  # precision exactly 1: every reported pair was checked
    assert len(found & truth) / len(truth) >= 0.99
    # Not all pairs: the candidates are a small fraction of the n^2/2 an all-pairs pass compares.
    n = len(shas)
    assert counts["candidates"] < n * (n - 1) / 2 / 20


def test_groups_are_brute_forces_components_and_sizes_count_rows(grouped):
    shas, vecs, row_shas, runs = grouped
    truth = _components(sorted(set(s for s in row_shas if s)), neardup.brute_force_pairs(shas, vecs, T))
    _, _, table = runs[0]
    rows = table.to_pylist()
    agree = sum(r[S.IMAGE_GROUP] == truth[r[K.IMAGE_SHA256]] for r in rows if r[K.IMAGE_SHA256])
    assert agree / sum(1 for r in rows if r[K.IMAGE_SHA256]) >= 0.99
    sizes = {}
    for r in rows:
        if r[S.IMAGE_GROUP] is not None:
            sizes[r[S.IMAGE_GROUP]] = sizes.get(r[S.IMAGE_GROUP], 0) + 1
    for r in rows:
        if r[K.IMAGE_SHA256] is None:
            assert r[S.IMAGE_GROUP] is None and r[S.IMAGE_GROUP_SIZE] is None
        else:
            assert r[S.IMAGE_GROUP_SIZE] == sizes[r[S.IMAGE_GROUP]]
            assert r[S.IMAGE_GROUP] <= r[K.IMAGE_SHA256]  # named by the smallest hash
    assert any(r[S.IMAGE_GROUP_SIZE] > 2 for r in rows)
    unscored = [r for r in rows if r[K.IMAGE_SHA256] == _sha("unscored")]
    assert unscored[0][S.IMAGE_GROUP] == _sha("unscored") and unscored[0][S.IMAGE_GROUP_SIZE] == 1
    assert table.schema.field(S.IMAGE_GROUP_SIZE).type == pa.int32()


def test_the_same_catalog_gives_the_same_groups_whatever_the_piece_order(grouped):
    _, _, _, runs = grouped
    first = {r["id"]: (r[S.IMAGE_GROUP], r[S.IMAGE_GROUP_SIZE]) for r in runs[0][2].to_pylist()}
    again = {r["id"]: (r[S.IMAGE_GROUP], r[S.IMAGE_GROUP_SIZE]) for r in runs[1][2].to_pylist()}
    assert first == again


def test_the_driver_never_holds_an_embedding(ray_session, tmp_path, monkeypatch):
    """Structural: on the driver, every table read and the union-find's input have no embedding
    column (the passes that read embeddings run as Ray tasks, in other processes)."""
    shas, vecs = _planted(n_images=200, seed=4)
    row_shas, matrix, valid = _rows(shas, vecs, seed=5)
    paths = _write_pieces(tmp_path / "pieces", row_shas, matrix, valid, pieces=3)
    seen = []
    original_read, original_components = neardup.pq.read_table, neardup.components

    def read(*args, **kwargs):
        table = original_read(*args, **kwargs)
        seen.append(table.schema)
        return table

    def components(edges):
        seen.append(edges.schema)
        return original_components(edges)

    monkeypatch.setattr(neardup.pq, "read_table", read)
    monkeypatch.setattr(neardup, "components", components)
    import pipelines.reuse.passes as passes

    original_dir = passes._read_dir
    monkeypatch.setattr(neardup, "_read_dir", lambda *a, **k: seen.append(a[2]) or original_dir(*a, **k))
    neardup.group_near_duplicates(paths, pafs.LocalFileSystem(), str(tmp_path / "work"), rows=len(row_shas), dim=DIM,
                                  threshold=T)
    assert seen and neardup.EDGE_SCHEMA in seen
    for schema in seen:
        assert not any(pa.types.is_binary(f.type) or pa.types.is_fixed_size_list(f.type) for f in schema), schema


def test_banding_grows_slowly_with_rows():
    bits, bands = neardup.banding(200_000, 0.95)
    p = 1 - np.arccos(0.95) / np.pi
    assert 1 - (1 - p ** bits) ** bands >= neardup.RECALL_AT_T
    assert neardup.banding(50_000_000, 0.95)[0] > bits
    assert neardup.band_keys(np.ones((2, 4), np.float32), 3, 5).shape == (2, 5)


def test_chunked_candidates_give_the_same_edges(grouped, tmp_path, monkeypatch):
    """Passes 1-5 in this process (plain functions) with candidates attached 7 at a time, over
    several buckets: the same edges as the Ray run's single chunk and bucket."""
    shas, vecs, row_shas, runs = grouped
    matrix, valid = vectors.to_numpy(_rebuild(row_shas, shas, vecs))
    paths = _write_pieces(tmp_path / "pieces", row_shas, matrix, valid, pieces=4)
    monkeypatch.setattr(neardup, "CHUNK_PAIRS", 7)
    fs, work, buckets = pafs.LocalFileSystem(), str(tmp_path / "work"), 3
    bits, bands = neardup.banding(len(row_shas), T)
    one = lambda **kw: pa.table({k: [v] for k, v in kw.items()})  # noqa: E731
    for piece, path in enumerate(paths):
        neardup.piece_images(one(path=path, piece=piece), fs=fs, work=work, buckets=buckets)
    for b in range(buckets):
        neardup.image_bucket(one(bucket=b), fs=fs, work=work, buckets=buckets, dim=DIM, bits=bits, bands=bands)
    for b in range(buckets):
        neardup.band_bucket(one(bucket=b), fs=fs, work=work, buckets=buckets)
    for b in range(buckets):
        neardup.attach_first(one(bucket=b), fs=fs, work=work, buckets=buckets)
    for b in range(buckets):
        neardup.check_pairs(one(bucket=b), fs=fs, work=work, dim=DIM, threshold=T)
    edges = neardup._read_edges(fs, work, buckets)
    pairs = lambda e: {tuple(sorted(p)) for p in zip(e.column("sha_a").to_pylist(), e.column("sha_b").to_pylist())}  # noqa: E731
    assert pairs(edges) == pairs(runs[0][1]) and edges.num_rows
    assert len(list((tmp_path / "work" / "half").rglob("*-c00001.parquet")))  # more than one chunk was written


def _rebuild(row_shas, shas, vecs):
    by_sha = dict(zip(shas, vecs))
    matrix = np.array([by_sha.get(s, np.zeros(DIM, np.float16)) for s in row_shas], np.float16)
    return vectors.fixed_array(matrix, np.array([s in by_sha for s in row_shas]))


def test_in_memory_groups_equal_the_passes(grouped):
    """A notebook audit's rows are grouped in memory (jobs.audit): the same groups as the passes."""
    _, _, _, runs = grouped
    table = runs[0][2]
    matrix, valid = vectors.to_numpy(table.column(S.IMAGE_EMBEDDING))
    groups, sizes = neardup.group_in_memory(table.column(K.IMAGE_SHA256).to_pylist(), matrix, valid, T)
    assert groups == table.column(S.IMAGE_GROUP).to_pylist()
    assert sizes == table.column(S.IMAGE_GROUP_SIZE).to_pylist()
