"""Image URLs over HTTP(S) in the decode tasks and in a whole run, against a loopback server that
injects faults (tests/http_server.py). Every failure is a row's image_error; a run never fails
because of one URL; each URL is fetched once per run."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip_ops.samples import draw_shape
from pipelines import schema as S
from pipelines.config import build_config
from pipelines.dataflow.stages import ScoreStage, decode_batch
from pipelines.storage import HttpSettings
from tests.http_server import Answer, FaultServer

IMAGES = {name: draw_shape(*name.split("-")) for name in ("red-circle", "blue-square", "green-triangle")}
SETTINGS = HttpSettings(timeout=1.0, retries=2, backoff=0.01, allow_private=True)


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def _decode(uris, tiny_itm, http, limit=None, texts=None):
    batch = pa.table({"text": texts or ["a picture"] * len(uris), "uri": uris})
    return decode_batch(batch, text_column="text", image_column="uri", from_uri=True, score_model=tiny_itm,
                        caption_model=None, http=http, max_image_bytes=limit)


def test_each_fault_is_its_rows_error(server, tiny_itm):
    red = IMAGES["red-circle"]
    routes = {
        "ok": server.route("/ok.jpg", Answer(body=red)),
        "404": server.route("/gone.jpg", Answer(404, b"<html>SECRET-BODY</html>")),
        "500-then-200": server.route("/flaky.jpg", Answer(500, b"SECRET-BODY"), Answer(body=red)),
        "429": server.route("/busy.jpg", Answer(429, headers={"Retry-After": "1"}), Answer(body=red)),
        "slow": server.route("/slow.jpg", Answer(body=red, trickle=0.01)),
        "redirect": server.route("/moved.jpg", Answer(301, headers={"Location": "/ok.jpg"})),
        "truncated": server.route("/cut.jpg", Answer(body=red, truncate=50)),
        "over-length": server.route("/big.jpg", Answer(body=red)),
        "over-no-length": server.route("/stream.jpg", Answer(body=red, no_length=True)),
        "not-an-image": server.route("/page.html", Answer(body=b"<html>hello</html>")),
    }
    limit = len(red) + 10
    server.route("/big.jpg", Answer(body=red + b"\0" * 100))
    server.route("/stream.jpg", Answer(body=red + b"\0" * 100, no_length=True))
    out = _decode(list(routes.values()), tiny_itm, SETTINGS, limit=limit)
    errors = dict(zip(routes, out.column(S.IMAGE_ERROR).to_pylist()))
    assert errors["ok"] is None and errors["500-then-200"] is None and errors["429"] is None and errors["redirect"] is None
    assert errors["404"] == f"cannot fetch image URL {routes['404']}: http 404"
    assert errors["slow"] == f"cannot fetch image URL {routes['slow']}: timed out after 1 s"
    assert errors["truncated"] == f"cannot fetch image URL {routes['truncated']}: truncated body after 2 retries"
    assert errors["over-length"] == f"image of {len(red) + 100} bytes exceeds the limit of {limit} bytes"
    assert errors["over-no-length"] == f"image of more than {limit} bytes exceeds the limit of {limit} bytes"
    assert errors["not-an-image"] == "unrecognised or unsupported image format"
    assert not any("SECRET-BODY" in (e or "") for e in errors.values())
    hashes = dict(zip(routes, out.column("image_sha256").to_pylist()))
    import hashlib

    assert hashes["ok"] == hashes["redirect"] == hashlib.sha256(red).hexdigest()  # the bytes received
    assert out.column(S.PIXELS_SCORE).is_valid().to_pylist() == [e is None for e in errors.values()]


def test_default_settings_refuse_loopback(server, tiny_itm):
    url = server.route("/ok.jpg", Answer(body=IMAGES["red-circle"]))
    out = _decode([url], tiny_itm, HttpSettings())
    assert out.column(S.IMAGE_ERROR).to_pylist() == [f"cannot fetch image URL {url}: refused: private address (127.0.0.1)"]
    assert server.requests["/ok.jpg"] == 0
    out = _decode([url], tiny_itm, None)  # no settings given: the defaults, guard on
    assert "refused: private address" in out.column(S.IMAGE_ERROR)[0].as_py()


def test_a_url_shared_by_rows_is_fetched_once_per_batch(server, tiny_itm):
    urls = [server.route(f"/{name}.jpg", Answer(body=data)) for name, data in IMAGES.items()]
    out = _decode(urls * 4, tiny_itm, SETTINGS)
    assert out.column(S.IMAGE_ERROR).null_count == 12
    assert all(server.requests[f"/{name}.jpg"] == 1 for name in IMAGES)


def test_config_carries_the_http_settings():
    config = build_config(dict(input="x", output="y", http_timeout="2.5", http_concurrency=3, http_per_host=2,
                               http_retries=0, http_allow_private=True, http_user_agent="night-job/1"))
    assert config.http_settings() == HttpSettings(timeout=2.5, concurrency=3, per_host=2, retries=0,
                                                  allow_private=True, user_agent="night-job/1")
    assert build_config(dict(input="x", output="y")).http_settings() == HttpSettings()


def test_cli_flags_reach_the_config():
    from jobs.score import config_from_args, make_parser

    args = make_parser().parse_args(["--input", "x", "--output", "y", "--http-allow-private", "--http-timeout", "3",
                                     "--http-retries", "1", "--http-concurrency", "5", "--http-per-host", "2"])
    settings = config_from_args(args).http_settings()
    assert (settings.allow_private, settings.timeout, settings.retries, settings.concurrency, settings.per_host) == (True, 3.0, 1, 5, 2)
    assert config_from_args(make_parser().parse_args(["--input", "x", "--output", "y"])).http_allow_private is False


def test_both_plans_decode_with_the_configs_http_settings():
    from pipelines.dataflow.graph import decode_kwargs

    config = build_config(dict(input="x", output="y", http_allow_private=True, http_timeout=4))
    assert decode_kwargs(config)["http"] == config.http_settings()


def test_a_run_over_http_scores_as_the_same_bytes_do(ray_session, tiny_itm, tmp_path):
    """One job run with URL images, duplicates across files and rows, and faults: every row once,
    scores equal to the same bytes scored in process, and (keyed plan) each URL fetched once per run."""
    from pipelines.run import run_job

    with FaultServer() as server:
        names = list(IMAGES)
        urls = {n: server.route(f"/img/{n}.jpg", Answer(500), Answer(body=IMAGES[n])) for n in names}
        gone = server.route("/img/gone.jpg", Answer(404))
        records = []
        for i in range(9):
            name = names[i % 3]
            records.append({"id": i, "text": f"a {name.replace('-', ' ')}", "uri": urls[name]})
        records.append({"id": 9, "text": "missing", "uri": gone})
        catalog = tmp_path / "catalog"
        catalog.mkdir()
        for part in range(2):
            pq.write_table(pa.Table.from_pylist(records[part * 5:(part + 1) * 5]), catalog / f"part-{part}.parquet")
        config = build_config(dict(
            input=str(catalog), output=str(tmp_path / "out"), itm_model=tiny_itm, caption_model="none", device="cpu",
            image_uri_column="uri", decode_batch_size=4, score_batch_size=4, http_allow_private=True,
            http_retries=2, evidence="none", text_languages="any",
        ))
        summary = run_job(config)
        fetched = Counter({path: n for path, n in server.requests.items()})
    assert summary.rows_written == len(records)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == list(range(10))
    assert rows[9]["status"] == "image_error" and rows[9]["error"] == f"cannot fetch image URL {gone}: http 404"
    # Each URL's first answer is a 500, then 200: two requests, by the one task that fetches its
    # bucket; the hash and compute passes take the bytes from the work directory.
    assert fetched == Counter({f"/img/{n}.jpg": 2 for n in names} | {"/img/gone.jpg": 1})
    assert summary.as_dict() is not None
    # The same bytes and texts scored in process, without HTTP.
    local = pa.table({"text": [r["text"] for r in records[:9]],
                      "image": pa.array([IMAGES[names[i % 3]] for i in range(9)], pa.binary())})
    decoded = decode_batch(local, text_column="text", image_column="image", from_uri=False, score_model=tiny_itm, caption_model=None)
    expected = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")(decoded)
    np.testing.assert_allclose([rows[i]["itm_score"] for i in range(9)], expected.column("itm_score").to_pylist(), rtol=0, atol=1e-6)
    np.testing.assert_allclose([rows[i]["itc_score"] for i in range(9)], expected.column("itc_score").to_pylist(), rtol=0, atol=1e-6)
    assert all(rows[i]["status"] == "ok" for i in range(9))
