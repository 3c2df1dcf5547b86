"""A run with nothing left to compute never starts Ray: neither a rerun of a committed result nor
a run whose every row an earlier attempt already staged. Starting Ray for them cost 10-20 s, and
a Ray started by one test and never shut down broke every later ``ray.init`` in the session
(tests/pipelines/test_exactly_once.py before a ``ray_session`` test)."""

from __future__ import annotations

import pytest

from blip_ops.identity import checkpoint_identity
from blip_ops.samples import sample_catalog
from pipelines import keys
from pipelines.commit.delta import committer_for
from pipelines.config import build_config
from pipelines.dataflow import runtime
from pipelines.reuse.sources import MANIFEST_KEYS
from pipelines.run import ALREADY_COMMITTED, COMMITTED, run_job
from pipelines.storage import locate
from tests.conftest import write_catalog
from tests.pipelines.test_exactly_once import stage_everything


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to reach Ray fails the test, whichever tests ran before in this process."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started or connected for a run with nothing left to compute")

    was_up = ray.is_initialized()
    monkeypatch.setattr(runtime, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert ray.is_initialized() == was_up


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_fully_staged_run_and_its_rerun_commit_without_ray(fmt, tiny_itm, tmp_path, no_ray):
    if fmt == "delta":
        pytest.importorskip("deltalake")
    catalog = write_catalog(tmp_path / "in", sample_catalog(6, seed=3), files=2)
    config = build_config({"input": str(catalog), "output": str(tmp_path / "out"), "output_format": fmt,
                           "itm_model": tiny_itm, "caption_model": "none", "device": "auto"})
    stage_everything(config, "r-staged")

    summary = run_job(config)
    assert (summary.outcome, summary.run_id, summary.rows_written, summary.resumed_rows) == (COMMITTED, "r-staged", 6, 6)
    # The manifest still records the digests a later --reuse matches against, as the Ray path
    # computes them: the checkpoint's content identity, on the CPU (this Ray would find no GPU).
    manifest = committer_for(config).read_committed(locate(config.output))
    expected = keys.score_settings(config, checkpoint_identity(tiny_itm), "cpu").digest
    assert manifest[MANIFEST_KEYS] == {"score": expected, "caption": None}

    rerun = run_job(config)
    assert (rerun.outcome, rerun.run_id) == (ALREADY_COMMITTED, "r-staged")


def test_a_cluster_address_still_connects_when_nothing_is_left(tiny_itm, tmp_path, monkeypatch):
    """Only a local Ray is skipped: against a cluster, its devices decide the digests."""
    catalog = write_catalog(tmp_path / "in", sample_catalog(4, seed=3), files=1)
    config = build_config({"input": str(catalog), "output": str(tmp_path / "out"), "itm_model": tiny_itm,
                           "caption_model": "none", "device": "cpu", "ray_address": "ray://cluster:10001"})
    stage_everything(config, "r-staged")
    called = []

    def connect(address):
        called.append(address)
        raise ConnectionError("no cluster here")

    monkeypatch.setattr(runtime, "connect", connect)
    with pytest.raises(ConnectionError):
        run_job(config)
    assert called == ["ray://cluster:10001"]
