"""Notebook audits: audit() on DataFrames and Parquet paths, sampling, filters, and show_flagged's HTML."""

import html
import re

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import sample_catalog
from jobs.audit import audit, release_models, select_rows, show_flagged
from pipelines.config import ConfigError, build_config
from pipelines.preflight import InputError
from pipelines.schema import output_schema
from tests.conftest import write_catalog
from tests.reference import itm_reference

MARKUP = '<script>alert("x")</script><b>bold</b>'


def _frame(n=16, seed=7):
    records = sample_catalog(n, seed=seed)
    for index, record in enumerate(records):
        record["category"] = "shoes" if index % 2 else "hats"
        del record["expected"]
    records[1]["text"] = MARKUP + " " + records[1]["text"]
    records[1]["id"] = "<i>id-1</i>"
    return pd.DataFrame(records)


@pytest.fixture(scope="module")
def frame():
    return _frame()


@pytest.fixture(scope="module")
def options(tiny_itm, tiny_caption):
    return dict(itm_model=tiny_itm, caption_model=tiny_caption, device="cpu", max_new_tokens=4,
                itm_threshold=0.99, score_batch_size=4, caption_batch_size=4, decode_batch_size=4)


@pytest.fixture(scope="module")
def audited(ray_session, frame, options):
    yield audit(frame, **options)
    release_models()


def test_warm_actors_are_reused_and_give_the_pipelines_rows(audited, frame, options):
    from pipelines.dataflow import warm

    again = audit(frame, **options)
    assert len(warm._actors) == 1  # the second call reused the first call's actors
    batch = audit(frame, warm_models=False, **options)
    assert len(warm._actors) == 1
    compared = ["id", "itc_score", "itm_score", "caption", "flagged", "flag_reasons", "status", "error", "text_truncated"]
    for other in (again, batch):
        pd.testing.assert_frame_equal(audited[compared], other[compared])


def test_same_columns_as_the_cli_plus_the_image_column(audited, frame):
    schema = output_schema(pa.Table.from_pandas(frame, preserve_index=False).schema, "image")
    assert list(audited.columns) == schema.names + ["image"]
    assert len(audited) == len(frame)
    # Input order is kept, and each row keeps its own image.
    assert audited["id"].tolist() == frame["id"].tolist()
    assert audited["image"].tolist() == frame["image"].tolist()
    assert set(audited["status"]) == {"ok", "image_error", "text_error"}
    assert audited.attrs["blip_moderate"]["run_id"].startswith("audit-")


def test_scores_are_the_checkpoints(audited, frame, tiny_itm):
    reference = itm_reference(tiny_itm)
    # The reference does not truncate; the markup row's long text is truncated to 35 tokens.
    ok = audited[(audited["status"] == "ok") & ~audited["text_truncated"]].head(3)
    assert len(ok) == 3
    for _, row in ok.iterrows():
        itc, itm = reference(row["image"], row["text"])
        assert row["itc_score"] == pytest.approx(itc, abs=1e-3)
        assert row["itm_score"] == pytest.approx(itm, abs=1e-3)
        assert row["flagged"] == (itm < 0.99 or itc < 0.2)
        assert isinstance(row["caption"], str)


def _config(options, source="<frame>", **extra):
    return build_config(dict(options, input=source, output="<audit>", **extra))


def test_sample_is_deterministic_and_where_restricts(frame, options):
    config = _config(options)
    pick = lambda **kw: select_rows(frame, config, **kw).column("id").to_pylist()  # noqa: E731
    shoes = frame[frame["category"] == "shoes"]["id"].tolist()
    first = pick(sample=5, seed=3, where="category == 'shoes'")
    assert len(first) == 5 and set(first) <= set(shoes)
    assert first == [i for i in shoes if i in first]  # input order kept
    assert first == pick(sample=5, seed=3, where="category == 'shoes'")
    assert first != pick(sample=5, seed=4, where="category == 'shoes'")
    assert pick(where=pc.field("category") == "shoes") == shoes
    assert pick(sample=100) == frame["id"].tolist()
    assert pick(sample=0) == []


def test_parquet_path_with_hive_partitions_and_pushdown(frame, options, tmp_path):
    for category, part in frame.groupby("category"):
        directory = tmp_path / f"category={category}"
        directory.mkdir()
        table = pa.Table.from_pandas(part.drop(columns=["category"]), preserve_index=False)
        # Small row groups: selection and image reads go row group by row group.
        pq.write_table(table.slice(0, 5), directory / "a.parquet", row_group_size=2)
        pq.write_table(table.slice(5), directory / "b.parquet", row_group_size=3)
    config = _config(options, str(tmp_path))
    table = select_rows(str(tmp_path), config, where=pc.field("category") == "shoes", sample=3, seed=1)
    assert table.num_rows == 3 and set(table.column("category").to_pylist()) == {"shoes"}
    by_id = frame.set_index("id")
    assert all(by_id.loc[row["id"], "image"] == row["image"] for row in table.to_pylist())
    everything = select_rows(str(tmp_path), config)
    assert sorted(everything.column("id").to_pylist()) == sorted(frame["id"])
    assert all(by_id.loc[row["id"], "image"] == row["image"] for row in everything.to_pylist())
    query = select_rows(str(tmp_path), config, where="category == 'hats' and id != 'item-0000'")
    expected = frame[(frame.category == "hats") & (frame.id != "item-0000")]["id"]
    assert sorted(query.column("id").to_pylist()) == sorted(expected)
    sampled = select_rows(str(tmp_path), config, where="category == 'hats'", sample=2, seed=5)
    assert sampled.column("id").to_pylist() == select_rows(str(tmp_path), config, where="category == 'hats'", sample=2, seed=5).column("id").to_pylist()


def test_audit_of_a_path_with_uri_images(ray_session, frame, options, tmp_path):
    paths = []
    for index, data in enumerate(frame["image"].head(6)):
        path = tmp_path / "images" / f"{index}.img"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        paths.append(str(path))
    catalog = pd.DataFrame({"id": frame["id"].head(6), "text": frame["text"].head(6), "uri": paths, "category": "x"})
    write_catalog(tmp_path / "catalog", catalog.to_dict("records"), files=2)
    df = audit(str(tmp_path / "catalog"), sample=4, seed=0, image_uri_column="uri", captions="none", **options)
    assert len(df) == 4 and "image" not in df.columns and df["caption"].isna().all()
    assert df["uri"].tolist() == [p for p in paths if p in set(df["uri"])]
    expected = {}
    for path, data, text in zip(paths, frame["image"], frame["text"]):
        expected[path] = "image_error" if data == b"not an image at all" else "text_error" if not text.strip() else "ok"
    assert df["status"].tolist() == [expected[uri] for uri in df["uri"]]
    assert df.loc[df["status"] == "ok", "itm_score"].notna().all()
    view = show_flagged(df)
    assert view.html.count("<img src=") == sum(1 for r in view.rows if r["status"] != "image_error")
    # Overlays read the image through its URI too.
    assert view.html.count('<img class="overlay"') == sum(1 for r in view.rows if r["status"] == "ok") > 0


def test_options_are_validated_before_anything_runs(frame, options, tmp_path):
    with pytest.raises(ConfigError, match="itm_treshold: unknown option"):
        audit(frame, itm_treshold=0.3, **options)
    with pytest.raises(TypeError, match="output"):
        audit(frame, output=str(tmp_path), **options)
    with pytest.raises(InputError, match="model directory does not exist"):
        audit(frame, **dict(options, itm_model=str(tmp_path / "missing")))
    with pytest.raises(InputError, match="no column 'title'"):
        audit(frame, text_column="title", **options)
    with pytest.raises(ValueError, match="sample"):
        audit(frame, sample=-1, **options)
    with pytest.raises(TypeError, match="where"):
        audit(frame, where=["category"], **options)
    with pytest.raises(ConfigError, match="text_languages"):
        audit(frame, text_languages="english", **options)
    with pytest.raises(InputError, match="agreement model directory does not exist"):
        audit(frame, agreement_model=str(tmp_path / "no-model"), **options)


def test_agreement_language_and_size_limit_in_an_audit(ray_session, frame, options):
    small = frame.head(6).copy().reset_index(drop=True)
    sizes = small["image"].map(lambda data: len(data) if isinstance(data, bytes) else 0)
    limit = int(sizes.max()) - 1  # the largest image is over the limit
    decodable = [i for i in range(len(small)) if 0 < sizes[i] <= limit and small["text"][i].strip()]
    german_row = decodable[0]
    small.loc[german_row, "text"] = "Wasserdichte Wanderschuhe für Herren aus braunem Leder"
    df = audit(small, agreement_threshold=0.99, text_languages="en", max_image_bytes=limit, **options)
    too_large = (sizes > limit).values
    assert too_large.sum() >= 1 and (df.loc[too_large, "status"] == "image_error").all()
    assert df.loc[too_large, "error"].str.contains("exceeds the limit").all()
    german = df.iloc[german_row]
    assert german["status"] == "ok" and german["text_language"] == "de"
    assert "text_language_unsupported" in german["flag_reasons"]
    captioned = df["caption_agreement"].notna()
    assert captioned.any()
    assert all("caption_disagrees" in reasons for reasons in df.loc[captioned, "flag_reasons"])


def test_show_flagged_escapes_catalog_text(audited):
    view = show_flagged(audited, n=50)
    page = view._repr_html_()
    flagged = audited[audited["flagged"]]
    assert len(view.rows) == len(flagged)
    assert "<script>" not in page and "<b>bold</b>" not in page and "<i>id-1</i>" not in page
    assert html.escape(MARKUP, quote=True) in page and "&lt;i&gt;id-1&lt;/i&gt;" in page
    # One thumbnail per flagged row with a decodable image; the undecodable ones say so.
    decodable = int((flagged["status"] != "image_error").sum())
    assert page.count("<img src=") == decodable
    assert page.count("no image") == len(flagged) - decodable
    assert all(src.startswith("data:image/jpeg;base64,") for src in re.findall(r'<img (?:class="overlay" )?src="([^"]+)"', page))
    # Evidence (on by default for rows flagged by score): the heat map over the image and the top words.
    explained = int(flagged["evidence"].notna().sum())
    assert explained == int((flagged["status"] == "ok").sum()) > 0
    assert page.count('<img class="overlay"') == explained and page.count('class="words"') == explained
    assert page.count("no evidence") == len(flagged) - explained
    # pandas gives NaN for a missing caption and error; the page shows nothing, never "nan".
    assert flagged["caption"].isna().any() and flagged["error"].isna().any()
    assert not re.search(r">\s*nan\s*<", page) and "<div>nan</div>" not in page
    # Most confident mismatches first; rows that could not be checked last.
    scores = [r["itm_score"] for r in view.rows if r["status"] == "ok"]
    assert scores == sorted(scores)
    assert [r["status"] for r in view.rows][-1] != "ok"
    assert len(show_flagged(audited, n=2).rows) == 2


def test_evidence_option_and_the_overlay_function_on_any_row(ray_session, frame, options):
    from blip_ops.heatmap import overlay

    small = frame.head(8)
    everything = audit(small, evidence="all", **dict(options, itm_threshold=0.0, itc_threshold="none"))
    ok = everything["status"] == "ok"
    assert not everything["flagged"][ok].any()  # nothing flagged by score, yet every scored row explained
    assert everything["evidence"][ok].notna().all() and everything["evidence"][~ok].isna().all()
    row = everything[ok].iloc[0]
    picture = overlay(row["image"], row["evidence"])  # a notebook user's call on any row
    assert picture.size[0] > 0 and picture.mode == "RGB"
    nothing = audit(small, evidence="none", **options)
    assert nothing["evidence"].isna().all()
    release_models()


def test_the_documented_audit_examples_run(ray_session, frame, options, tmp_path, monkeypatch):
    """The notebook audit of docs/scoring.md and of the README, as written, on a catalog/ directory
    with a category column; the tiny checkpoints stand in for the real ones named there."""
    import jobs.audit as audit_module
    from tests import docs

    real_audit, results = audit_module.audit, []

    def with_tiny_models(source, **kwargs):
        results.append(real_audit(source, **{**options, **kwargs}))
        return results[-1]

    monkeypatch.setattr(audit_module, "audit", with_tiny_models)
    (tmp_path / "catalog").mkdir()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "catalog" / "part-0.parquet")
    monkeypatch.chdir(tmp_path)
    for heading in ("## Notebook audits", "## What you can do with it"):
        code = docs.block(heading, "python").replace('"Salesforce/blip-itm-base-coco"', repr(options["itm_model"]))
        namespace = {}
        exec(code, namespace)
        assert namespace["df"] is results[-1]
        assert list(namespace["df"].id) == list(frame.id[frame.category == "shoes"])
    assert len(results) == 2
    release_models()
