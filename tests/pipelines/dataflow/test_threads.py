"""The torch threads model actors really run with: asked of the actors, not computed here.

Ray sets ``OMP_NUM_THREADS`` from an actor's CPU reservation, so a default CPU actor on a 2-CPU
Ray ran torch on one thread while the other core idled (BENCHMARKS.md: 0.62x the naive loop).
"""

import pyarrow as pa
import pytest

from blip_ops.cpu_kernels import resolve_cpu_kernels
from pipelines.config import build_config
from pipelines.dataflow.resources import resolve_resources
from tests.pipelines.dataflow.test_resources import _RecordingDataset


@pytest.fixture
def cpu_config(tiny_itm):
    return build_config({"input": "in", "output": "out", "itm_model": tiny_itm, "caption_model": "none", "device": "cpu"})


def _pipeline_actor_threads(ray, config, resources) -> set[tuple[int, int, str]]:
    """(torch threads, chunk workers, image-side kernels) reported by ScoreStage actors built with
    exactly the pipeline's map_batches arguments."""
    import ray.data

    from pipelines.dataflow import stages
    from pipelines.dataflow.graph import score_rows

    arguments = score_rows(_RecordingDataset(), config, "run", resources, passthrough=["id"]).calls["ScoreStage"]
    arguments["udf_modifying_row_count"] = True

    class ThreadProbe(stages.ScoreStage):  # defined here: pickled by value for Ray's workers
        def __call__(self, batch, **call_kwargs):  # the pipeline's per-call arguments (thresholds)
            return pa.table({"threads": [self.torch_threads()], "workers": [self.chunk_workers()], "kernels": [self.cpu_kernels()]})

    ds = ray.data.range(4, override_num_blocks=2).map_batches(ThreadProbe, **arguments)
    return {(row["threads"], row["workers"], row["kernels"]) for row in ds.take_all()}


def test_a_default_cpu_scoring_actor_runs_on_every_core_of_a_2_cpu_ray(ray_session, cpu_config):
    resources = resolve_resources(cpu_config, 0, 2)  # ray_session is a 2-CPU local Ray
    assert (resources.score_cpus, resources.score_actors, resources.score_threads) == (1.0, (1, 1), 2)
    # Ray's reservation rule alone would leave it one thread (the old default; checked by hand
    # by dropping the setting: this test then fails with {(1, 1)}). Each core runs a chunk of the
    # batch (BlipScorer.chunk_workers), every torch op on one thread; the image side on the kernels
    # the default cpu_kernels=auto picks for this machine's CPU (blip_ops.cpu_kernels: oneDNN on AMD).
    assert _pipeline_actor_threads(ray_session, cpu_config, resources) == {(1, 2, resolve_cpu_kernels("auto"))}


def test_cpu_kernels_torch_reaches_the_actor(ray_session, tiny_itm):
    config = build_config({"input": "in", "output": "out", "itm_model": tiny_itm, "caption_model": "none",
                           "device": "cpu", "cpu_kernels": "torch"})
    assert _pipeline_actor_threads(ray_session, config, resolve_resources(config, 0, 2)) == {(1, 2, "torch")}


def test_a_warm_audit_actor_gets_the_same_threads(ray_session, cpu_config):
    from pipelines.dataflow import warm

    resources = resolve_resources(cpu_config, 0, 2)
    try:
        scorer = warm.warm_stages(cpu_config, resources).scorer
        assert ray_session.get(scorer.chunk_workers.remote()) == resources.score_threads == 2
        assert ray_session.get(scorer.torch_threads.remote()) == 1
        assert ray_session.get(scorer.cpu_kernels.remote()) == resolve_cpu_kernels("auto")
    finally:
        warm.release()


def test_a_stage_built_without_cores_leaves_its_callers_torch_threads_alone(tiny_itm):
    """torch's threads are process-wide: only a stage given its cores (a model actor) takes them over."""
    import torch

    from pipelines.dataflow.stages import ScoreStage

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        stage = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text")
        assert (torch.get_num_threads(), stage.chunk_workers()) == (2, 1)
        actor_like = ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text", threads=2)
        assert (torch.get_num_threads(), actor_like.chunk_workers()) == (1, 2)
    finally:
        torch.set_num_threads(before)
