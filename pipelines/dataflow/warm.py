"""Warm model actors for small interactive batches (notebook audits).

A Ray Data run builds its actor pools and loads its models on every call, which costs a
notebook user many seconds per audit. Here the same stage classes live in long-lived actors,
kept per (models, settings, Ray session) and reused by the next call: the stages' contract is
unchanged, so the rows are the ones the pipeline would produce. Decoding runs in Ray tasks,
the cheap flag and finalize steps in the calling process; models load only in the actors.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from ..config import JobConfig
from . import stages
from .graph import (
    ACTOR_RESTARTS,
    caption_stage_kwargs,
    decode_kwargs,
    finalize_kwargs,
    flag_kwargs,
    score_call_kwargs,
    score_stage_kwargs,
)
from .resources import Resources

# Larger audits go through the Ray Data pipeline, which decodes on many CPUs.
WARM_MAX_ROWS = 2048

_actors: dict[tuple, "WarmStages"] = {}


def _actor(cls, gpus: float, kwargs: dict):
    # A CPU-only warm actor reserves no CPU: it works only while its caller waits, and a
    # reservation held between audits would starve every other Ray Data run on a small machine.
    remote = ray.remote(cls).options(
        num_cpus=1 if gpus else 0, num_gpus=gpus, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS
    )
    return remote.remote(**kwargs)


class WarmStages:
    def __init__(self, config: JobConfig, resources: Resources):
        self.config = config
        self.resources = resources
        self.scorer = _actor(stages.ScoreStage, resources.score_gpus, score_stage_kwargs(config, resources))
        self.captioner = (
            _actor(stages.CaptionStage, resources.caption_gpus, caption_stage_kwargs(config, resources))
            if config.captioning
            else None
        )

    def run(self, table: pa.Table, run_id: str, passthrough: list[str]) -> pa.Table:
        """Decode (a Ray task per batch) feeds the warm scorer batch by batch; captions follow the flags."""
        config = self.config
        decode = ray.remote(stages.decode_batch).options(num_cpus=1, max_retries=3)
        size = self.resources.score_batch_size
        scored = [
            self.scorer.__call__.remote(decode.remote(table.slice(start, size), **decode_kwargs(config)), **score_call_kwargs(config))
            for start in range(0, table.num_rows, size)
        ]
        flagged = [
            stages.flag_batch(batch, **flag_kwargs(config))
            for batch in ray.get(scored)
        ]
        result = pa.concat_tables(flagged)
        if self.captioner is not None:
            size = self.resources.caption_batch_size
            refs = [self.captioner.__call__.remote(result.slice(start, size)) for start in range(0, result.num_rows, size)]
            result = pa.concat_tables(ray.get(refs))
        return stages.finalize_batch(result, **finalize_kwargs(config, run_id, passthrough))


def _key(config: JobConfig, resources: Resources) -> tuple:
    return (
        ray.get_runtime_context().get_job_id(),
        tuple(sorted(score_stage_kwargs(config, resources).items())),
        tuple(sorted(caption_stage_kwargs(config, resources).items())) if config.captioning else None,
        resources.score_gpus,
        resources.caption_gpus,
    )


def warm_stages(config: JobConfig, resources: Resources) -> WarmStages:
    """The warm actors for these settings, started on first use."""
    key = _key(config, resources)
    if key not in _actors:
        _actors[key] = WarmStages(config, resources)
    return _actors[key]


def release() -> int:
    """Stop every warm actor (frees their GPUs and memory); returns how many sets were stopped."""
    count = len(_actors)
    for warm in _actors.values():
        for actor in (warm.scorer, warm.captioner):
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001  (an actor of a Ray session that is gone)
                    pass
    _actors.clear()
    return count
