"""--embeddings end to end on the tiny checkpoint (D = 16): row by row and through the keyed plan,
Parquet and Delta, reuse with and without embeddings in the source, DuckDB reading the vectors."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from jobs.score import config_from_args, make_parser
from pipelines.config import build_config, load_yaml
from pipelines.run import run_job
from PIL import Image

from pipelines.dataflow.neardup import brute_force_pairs
from tests.conftest import image_bytes, write_catalog

DIM = 16  # blip_ops.tiny: image_text_hidden_size


def _records() -> list[dict]:
    records = sample_catalog(12, seed=9)
    for record in records:
        record.pop("expected")
    records += [dict(records[i], id=f"shared-{i}", text=f"listing {i} again") for i in (0, 2)]
    records.append(dict(records[3], id="same-pair"))
    # Near copies: the same pictures re-encoded as JPEG, and resized (other files, other hashes).
    for i in (0, 4):
        picture = Image.open(io.BytesIO(records[i]["image"])).convert("RGB")
        records.append(dict(records[i], id=f"jpeg-{i}", image=image_bytes(picture, "JPEG", quality=92)))
        records.append(dict(records[i], id=f"resized-{i}", image=image_bytes(picture.resize((picture.width - 3, picture.height - 2)))))
    return records


def _config(tiny_itm, catalog, output, **overrides):
    values = dict(input=str(catalog), output=str(output), itm_model=tiny_itm, caption_model=None, device="cpu",
                  score_batch_size=5, decode_batch_size=4, evidence="none")
    return build_config(dict(values, **overrides))


@pytest.fixture(scope="module")
def runs(ray_session, tiny_itm, tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    catalog = write_catalog(root / "catalog", _records(), files=2)
    run = lambda out, **kw: run_job(_config(tiny_itm, catalog, root / out, **kw))  # noqa: E731
    summaries = {
        "rowwise": run("rowwise", dedup=False, embeddings="both"),
        "keyed": run("keyed", embeddings="both", evidence="flagged"),
        "plain": run("plain"),
        "delta": run("delta", embeddings="image", output_format="delta", near_duplicates=True),
        "groups": run("groups", near_duplicates=True),
        "groups-again": run("groups-again", near_duplicates=True, dedup=False, score_batch_size=3, decode_batch_size=2),
    }
    summaries["from-plain"] = run("from-plain", embeddings="image", reuse=str(root / "plain"))
    summaries["from-keyed"] = run("from-keyed", embeddings="both", reuse=str(root / "keyed"))
    return root, summaries


def _rows(path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def test_written_as_a_true_fixed_size_list_null_where_not_scored(runs):
    root, _ = runs
    schema = pq.read_schema(next((root / "keyed").glob("*.parquet")))
    assert schema.field("image_embedding").type == pa.list_(pa.float16(), DIM)
    assert schema.field("text_embedding").type == pa.list_(pa.float16(), DIM)
    assert "image_embedding" not in pq.read_schema(next((root / "plain").glob("*.parquet"))).names
    for row in _rows(root / "keyed").values():
        scored = row["itc_score"] is not None
        assert (row["image_embedding"] is not None) == scored == (row["text_embedding"] is not None), row["id"]
        if scored:
            dot = float(np.dot(np.array(row["image_embedding"], np.float32), np.array(row["text_embedding"], np.float32)))
            assert dot == pytest.approx(row["itc_score"], abs=2 * 2.0 ** -11 + 1e-6), row["id"]
    rows = _rows(root / "keyed")
    assert any(r["itc_score"] is None for r in rows.values()) and any(r["itc_score"] is not None for r in rows.values())


def test_the_keyed_plan_carries_the_row_by_row_graphs_vectors(runs):
    root, _ = runs
    rowwise, keyed = _rows(root / "rowwise"), _rows(root / "keyed")
    assert sorted(rowwise) == sorted(keyed)
    for key, row in rowwise.items():
        for column in ("image_embedding", "text_embedding"):
            if row[column] is None:
                assert keyed[key][column] is None, key
            else:
                np.testing.assert_allclose(keyed[key][column], row[column], atol=2e-3)
    # Duplicates are collapsed to one model call, then every row gets the vectors.
    assert keyed["same-pair"]["image_embedding"] == keyed["item-0003"]["image_embedding"]
    assert keyed["shared-0"]["image_embedding"] == pytest.approx(keyed["item-0000"]["image_embedding"], abs=2e-3)


def test_duckdb_reads_the_vectors_as_float_arrays(runs):
    import duckdb

    root, _ = runs
    rows = _rows(root / "keyed")
    files = str(root / "keyed" / "*.parquet")
    con = duckdb.connect()
    got = con.execute(
        f"SELECT id, array_cosine_similarity(CAST(image_embedding AS FLOAT[{DIM}]), CAST(text_embedding AS FLOAT[{DIM}])) "
        f"FROM read_parquet('{files}') WHERE image_embedding IS NOT NULL"
    ).fetchall()
    assert len(got) == sum(r["itc_score"] is not None for r in rows.values()) > 0
    for key, cosine in got:
        assert cosine == pytest.approx(rows[key]["itc_score"], abs=3e-3)


def test_a_delta_output_holds_the_vectors(runs):
    from deltalake import DeltaTable

    root, summaries = runs
    table = DeltaTable(str(root / "delta")).to_pyarrow_table()
    # Delta has no half float and no fixed-size array: float32 in the files, array<float> in the log.
    assert pa.types.is_floating(table.schema.field("image_embedding").type.value_type)
    assert table.schema.field("image_embedding").type.value_type == pa.float32()
    files = list((root / "delta").glob("*.parquet"))
    assert pq.read_schema(files[0]).field("image_embedding").type == pa.list_(pa.float32(), DIM)
    assert "text_embedding" not in table.schema.names
    assert table.column("image_embedding").null_count == table.column("itc_score").null_count
    keyed = _rows(root / "keyed")
    for row in table.to_pylist():
        if row["image_embedding"] is not None:
            assert len(row["image_embedding"]) == DIM
            np.testing.assert_allclose(row["image_embedding"], keyed[row["id"]]["image_embedding"], atol=2e-3)


def test_a_source_without_embeddings_cannot_serve_a_run_that_asks_for_them(runs):
    root, summaries = runs
    summary = summaries["from-plain"]
    assert summary.reuse["rows_scores_reused"] == 0 and summary.reuse["pairs_scored"] > 0
    files = len(json.loads((root / "plain" / "_manifest.json").read_text())["files"])
    assert summary.reuse["source_files_without_embeddings"] == files > 0
    assert "held no embeddings" in summary.render()
    manifest = json.loads((root / "from-plain" / "_manifest.json").read_text())
    assert manifest["reuse"]["source_files_without_embeddings"] == files
    rows = _rows(root / "from-plain")
    assert all((r["image_embedding"] is not None) == (r["itc_score"] is not None) for r in rows.values())


def test_a_source_with_embeddings_serves_them_with_its_scores(runs):
    root, summaries = runs
    summary = summaries["from-keyed"]
    assert summary.reuse["pairs_scored"] == 0 and summary.reuse["rows_scores_reused"] > 0
    assert not summary.reuse.get("source_files_without_embeddings")
    source, reused = _rows(root / "keyed"), _rows(root / "from-keyed")
    assert sum(r["text_embedding"] is not None for r in reused.values()) == summary.reuse["rows_scores_reused"] > 0
    for key, row in reused.items():
        assert row["image_embedding"] == source[key]["image_embedding"], key
        assert row["text_embedding"] == source[key]["text_embedding"], key
        if row["itc_score"] is not None:
            assert row["scores_from_run"] == summaries["keyed"].run_id


def test_the_option_from_the_cli_yaml_and_nightly(tmp_path):
    from jobs.nightly import make_parser as nightly_parser

    args = make_parser().parse_args(["--input", "i", "--output", "o", "--embeddings", "both"])
    assert config_from_args(args).embeddings == "both"
    args = make_parser().parse_args(["--input", "i", "--output", "o", "--near-duplicates", "--near-duplicate-cosine", "0.9"])
    config = config_from_args(args)
    assert config.near_duplicates and config.near_duplicate_cosine == 0.9 and config.embeddings == "image"
    path = tmp_path / "c.yaml"
    path.write_text("embeddings: image\nnear-duplicates: true\n")
    config = build_config(dict(load_yaml(path), input="i", output="o"))
    assert config.embeddings == "image" and config.near_duplicates and config.near_duplicate_cosine == 0.95
    assert build_config(dict(input="i", output="o")).embeddings == "none"
    nightly = nightly_parser().parse_args(["--catalog", "c", "--output", "o", "--embeddings", "both", "--near-duplicates"])
    assert nightly.embeddings == "both" and nightly.near_duplicates
    from pipelines.config import ConfigError

    for bad in ({"embeddings": "text"}, {"near_duplicate_cosine": 1.5}):
        with pytest.raises(ConfigError):
            build_config(dict(input="i", output="o", **bad))


def test_audit_writes_the_vectors_too(runs, tiny_itm):
    from jobs.audit import audit

    root, _ = runs
    frame = audit(str(root / "catalog"), itm_model=tiny_itm, caption_model=None, device="cpu", evidence="none",
                  near_duplicates=True, reuse=str(root / "keyed"))
    rows = _rows(root / "keyed")
    assert "image_embedding" in frame.columns and "text_embedding" not in frame.columns
    for record in frame.to_dict("records"):
        if rows[record["id"]]["image_embedding"] is None:
            assert record["image_embedding"] is None
        else:
            np.testing.assert_allclose(np.asarray(record["image_embedding"], np.float32),
                                       rows[record["id"]]["image_embedding"], atol=2e-3)
    # Grouped in memory over the audit's rows: the batch run's groups for the same catalog.
    groups = _rows(root / "groups")
    by_id = {r["id"]: r for r in frame.to_dict("records")}
    assert by_id["shared-0"]["image_group"] == by_id["item-0000"]["image_group"] is not None
    for key, row in groups.items():
        assert by_id[key]["image_group"] == row["image_group"], key
        assert (by_id[key]["image_group_size"] if row["image_group_size"] is not None else None) == row["image_group_size"], key


def _brute_groups(rows: list[dict], threshold: float) -> dict[str, str]:
    """Components of same-hash or cosine >= threshold over the written embeddings, by all pairs."""
    vectors = {}
    for row in rows:
        if row["image_sha256"] and row["image_embedding"] is not None:
            vectors.setdefault(row["image_sha256"], row["image_embedding"])
    shas = sorted(vectors)
    pairs = brute_force_pairs(shas, np.array([vectors[s] for s in shas], np.float16), threshold)
    parent = {r["image_sha256"]: r["image_sha256"] for r in rows if r["image_sha256"]}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return {sha: find(sha) for sha in parent}


def test_near_duplicate_groups_end_to_end(runs):
    root, summaries = runs
    rows = list(_rows(root / "groups").values())
    schema = pq.read_schema(next((root / "groups").glob("*.parquet")))
    assert schema.field("image_group").type == pa.string() and schema.field("image_group_size").type == pa.int32()
    truth = _brute_groups(rows, 0.95)
    sizes = {}
    for row in rows:
        if row["image_group"] is not None:
            sizes[row["image_group"]] = sizes.get(row["image_group"], 0) + 1
    for row in rows:
        if row["image_sha256"] is None:
            assert row["image_group"] is None and row["image_group_size"] is None
            continue
        assert row["image_group"] == truth[row["image_sha256"]], row["id"]
        assert row["image_group_size"] == sizes[row["image_group"]], row["id"]
    by_id = {r["id"]: r for r in rows}
    # An exact copy always shares the group; the re-encoded and resized copies do where their cosine says so.
    assert by_id["shared-0"]["image_group"] == by_id["item-0000"]["image_group"]
    assert by_id["jpeg-0"]["image_sha256"] != by_id["item-0000"]["image_sha256"]
    assert any(r["image_group_size"] and r["image_group_size"] >= 3 for r in rows)
    record = json.loads((root / "groups" / "_manifest.json").read_text())["reuse"]["near_duplicates"]
    assert record["edges"] >= 1 and record["bands"] >= 1
    assert "image groups shared" in summaries["groups"].render()


def test_the_same_catalog_gives_the_same_groups(runs):
    root, _ = runs
    first = {k: (r["image_group"], r["image_group_size"]) for k, r in _rows(root / "groups").items()}
    again = {k: (r["image_group"], r["image_group_size"]) for k, r in _rows(root / "groups-again").items()}
    assert first == again


def test_a_delta_output_holds_the_groups(runs):
    from deltalake import DeltaTable

    root, _ = runs
    table = {r["id"]: r for r in DeltaTable(str(root / "delta")).to_pyarrow_table().to_pylist()}
    groups = _rows(root / "groups")
    for key, row in groups.items():
        assert (table[key]["image_group"], table[key]["image_group_size"]) == (row["image_group"], row["image_group_size"])


def _readme_queries() -> dict[str, str]:
    from tests import docs

    return docs.queries("## Embeddings and near-duplicate images")


def test_readme_duckdb_queries_on_groups_and_embeddings(runs):
    import duckdb

    root, _ = runs
    queries = {n: q.replace("'scored/", f"'{root / 'groups'}/").replace("FLOAT[256]", f"FLOAT[{DIM}]")
               for n, q in _readme_queries().items()}
    assert len(queries) == 3
    rows = _rows(root / "groups")
    con = duckdb.connect()
    largest = con.sql(queries["the largest image groups"]).fetchall()
    sizes = {}
    for r in rows.values():
        if r["image_group_size"] and r["image_group_size"] > 1:
            sizes[r["image_group"]] = r["image_group_size"]
    assert largest and [(g, n) for g, n, _, _ in largest] == sorted(sizes.items(), key=lambda i: (-i[1], i[0]))[:20]
    sharing = con.sql(queries["every listing sharing the photo of one id"]).fetchall()
    expected = sorted(k for k, r in rows.items() if r["image_group"] == rows["item-0000"]["image_group"])
    assert [r[0] for r in sharing] == expected and "shared-0" in expected
    nearest = con.sql(queries["the nearest listings to one id by image embedding"]).fetchall()
    assert nearest[0][2] == pytest.approx(1.0, abs=1e-3) and len(nearest) == 10
    assert [c for _, _, c in nearest] == sorted((c for _, _, c in nearest), reverse=True)


def test_similar_returns_the_exact_nearest_rows(runs):
    from jobs.similar import similar

    root, _ = runs
    rows = _rows(root / "groups")
    frame = similar(str(root / "groups"), "item-0000", k=4)
    query = np.array(rows["item-0000"]["image_embedding"], np.float32)
    cosines = {}
    for key, row in rows.items():
        if row["image_embedding"] is not None:
            v = np.array(row["image_embedding"], np.float32)
            cosines[key] = float(v @ query / np.linalg.norm(v) / np.linalg.norm(query))
    expected = sorted(cosines.items(), key=lambda i: -i[1])[:4]
    assert list(frame["cosine"]) == pytest.approx([c for _, c in expected], abs=1e-5)
    assert set(frame["id"]) >= {k for k, c in expected if c < expected[-1][1] - 1e-4}
    assert frame["thumbnail"].notna().all() and frame["thumbnail"][0].startswith("data:image/")
    with pytest.raises(KeyError):
        similar(str(root / "groups"), "no-such-id")
    with pytest.raises(ValueError):
        similar(str(root / "plain"), "item-0000")


def test_report_shows_images_shared_across_listings(runs):
    root, _ = runs
    page = (root / "groups" / "_report.html").read_text()
    assert "Images shared across listings" in page
    section = page.split('id="shared-images"', 1)[1]
    rows = _rows(root / "groups")
    largest = max((r for r in rows.values() if r["image_group_size"]), key=lambda r: (r["image_group_size"], r["image_group"]))
    assert largest["image_group"][:16] in section and "texts agree" in section and "data:image/" in section
    assert "Images shared across listings" not in (root / "keyed" / "_report.html").read_text()
