"""Overlapped model actors: the option's placement rule, the graph's Ray arguments, and a Ray run
whose score actor takes two batches at once and still returns every batch's own rows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from jobs import score
from pipelines.config import build_config
from pipelines.dataflow.graph import caption_stage_kwargs, overlapped, score_rows, score_stage_kwargs
from pipelines.dataflow.resources import resolve_resources
from tests.pipelines.dataflow.test_resources import _RecordingDataset

BASE = {"input": "in", "output": "out", "caption_model": "some/blip2"}


@pytest.mark.parametrize("overlap, cluster_gpus, calls", [
    ("auto", 1, 2), ("auto", 0, 1),  # on with a GPU; off on the CPU, where it measured slower (BENCHMARKS.md)
    ("on", 0, 2), ("off", 1, 1),
])
def test_overlap_gives_two_concurrent_calls_per_actor(overlap, cluster_gpus, calls):
    config = build_config(dict(BASE, overlap=overlap))
    resources = resolve_resources(config, cluster_gpus, cluster_cpus=16)
    assert resources.score_calls == resources.caption_calls == calls
    ds = score_rows(_RecordingDataset(), config, "run", resources, passthrough=["id"])
    for stage in ("ScoreStage", "CaptionStage"):
        strategy = ds.calls[stage]["compute"]
        assert strategy.max_concurrent_calls_per_actor == (calls if calls > 1 else None)
        assert strategy.enable_true_multi_threading == (calls > 1)


def test_each_stage_by_its_own_placement():
    config = build_config(dict(BASE, score_gpus=0, caption_gpus=0.5))
    resources = resolve_resources(config, 1, cluster_cpus=16)
    assert (resources.score_calls, resources.caption_calls) == (1, 2)


def test_caption_rows_from_memory_only_for_auto_batches_on_a_gpu():
    gpu = resolve_resources(build_config(BASE), 1, cluster_cpus=16)
    assert caption_stage_kwargs(build_config(BASE), gpu)["rows_from_memory"] == gpu.caption_batch_size == 512
    fixed = build_config(dict(BASE, caption_batch_size=128))
    assert caption_stage_kwargs(fixed, resolve_resources(fixed, 1, 16))["rows_from_memory"] is None
    cpu = build_config(dict(BASE, device="cpu"))
    assert caption_stage_kwargs(cpu, resolve_resources(cpu, 0, 16))["rows_from_memory"] is None


def test_flags_reach_the_config_and_the_score_stage():
    args = score.make_parser().parse_args(["--input", "a", "--output", "b", "--overlap", "off", "--shape-buckets", "on",
                                           "--torch-compile", "on", "--precision", "bf16-weights"])
    config = score.config_from_args(args)
    assert (config.overlap, config.shape_buckets, config.torch_compile, config.precision) == ("off", True, True, "bf16-weights")
    kwargs = score_stage_kwargs(config, resolve_resources(config, 0, 16))
    assert (kwargs["shape_buckets"], kwargs["compile"], kwargs["precision"]) == (True, True, "bf16-weights")
    assert overlapped(1) == {}


def _decoded_batch(tiny_itm, rows: int) -> pa.Table:
    from blip_ops.samples import sample_catalog
    from pipelines.dataflow.stages import decode_batch

    table = pa.Table.from_pylist(sample_catalog(rows, seed=3))
    texts = table.column("text").to_pylist()
    texts[2] = "  "  # a text_error row: not scored, so batches differ in their model rows
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    return decode_batch(table, text_column="text", image_column="image", from_uri=False,
                        score_model=tiny_itm, caption_model=None)


def test_a_ray_score_actor_overlaps_two_batches_and_returns_their_own_rows(ray_session, tiny_itm):
    import ray.data
    from ray.data import ActorPoolStrategy

    from pipelines.dataflow import stages

    decoded = _decoded_batch(tiny_itm, 16)
    kwargs = dict(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")
    expected = stages.ScoreStage(**kwargs)(decoded)

    class SlowModel(stages.ScoreStage):  # defined here: pickled by value for Ray's workers
        """Records order, not clock times (the machine may be busy): how many model calls were in
        flight at once, and whether another batch's call had entered the actor while a model call ran.
        The first model call holds on until that has been seen (Ray hands an overlapped actor its
        first two batches at once), bounded by a generous 120 s: a loaded machine delays Ray's
        dispatch by seconds, not minutes; without overlap it never happens, and the test fails after
        that wait."""

        def __init__(self, **kw):
            super().__init__(**kw)
            forward, guard = self.scorer._forward, threading.Lock()
            self.active_calls, self.models_in_flight, self.most_in_flight, self.model_calls = 0, 0, 0, 0
            self.next_batch_in = threading.Event()
            self.guard, self.local = guard, threading.local()

            def slow(*args):
                with guard:
                    self.models_in_flight += 1
                    self.most_in_flight = max(self.most_in_flight, self.models_in_flight)
                    self.model_calls += 1
                    self.local.model_call = self.model_calls
                    if self.active_calls > 1:
                        self.next_batch_in.set()
                try:
                    if self.local.model_call == 1:
                        self.next_batch_in.wait(120)
                    time.sleep(0.1)  # a slow model: a second model call entering now would be seen in flight
                    return forward(*args)
                finally:
                    with guard:
                        self.models_in_flight -= 1

            self.scorer._forward = slow

        def __call__(self, batch):
            with self.guard:
                self.active_calls += 1
                if self.models_in_flight:  # this batch arrived while another batch's model call ran
                    self.next_batch_in.set()
            try:
                out = super().__call__(batch)
            finally:
                with self.guard:
                    self.active_calls -= 1
            n = out.num_rows
            return (out.append_column("model_call", pa.array([self.local.model_call] * n))
                    .append_column("most_in_flight", pa.array([self.most_in_flight] * n))
                    .append_column("next_batch_in", pa.array([self.next_batch_in.is_set()] * n)))

    ds = ray.data.from_arrow([decoded.slice(i, 4) for i in range(0, 16, 4)]).map_batches(
        SlowModel, batch_format="pyarrow", batch_size=4, fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=1, **overlapped(2)), num_cpus=0.5,
    )
    result = pa.concat_tables(ray.get(ref) for ref in ds.to_arrow_refs())
    by_id = {row["id"]: row for row in result.to_pylist()}
    for row in expected.to_pylist():
        got = by_id[row["id"]]
        # Batches of 4 against one of 16: equal up to float rounding (other GEMM shapes).
        assert got["itc_score"] == pytest.approx(row["itc_score"], abs=1e-6, nan_ok=True) or got["itc_score"] is row["itc_score"]
        assert got["itm_score"] == pytest.approx(row["itm_score"], abs=1e-6, nan_ok=True) or got["itm_score"] is row["itm_score"]
        assert got["text_truncated"] == row["text_truncated"]
    rows = list(by_id.values())
    assert len({r["model_call"] for r in rows}) == 4
    # One model call at a time...
    assert max(r["most_in_flight"] for r in rows) == 1
    # ...while Ray had already handed the actor the next batch (its call entered during another batch's model call).
    assert any(r["next_batch_in"] for r in rows)
    # Each batch's rows come back in their own order.
    numbers = [int(i.split("-")[-1]) for i in result.column("id").to_pylist()]
    assert all(np.all(np.diff(numbers[k:k + 4]) == 1) for k in range(0, 16, 4))


def test_nightly_takes_the_same_flags():
    from jobs import nightly

    args = vars(nightly.make_parser().parse_args(["--catalog", "c", "--output", "o", "--overlap", "on",
                                                  "--shape-buckets", "off", "--precision", "bf16-weights"]))
    assert (args["overlap"], args["shape_buckets"], args["precision"]) == ("on", "off", "bf16-weights")
    assert build_config(dict(BASE, overlap=args["overlap"], shape_buckets=args["shape_buckets"])).shape_buckets is False
