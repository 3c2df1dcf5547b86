"""Where each model stage runs: GPUs, CPUs, device, actor pool bounds and batch sizes.

Resolved from the config and the Ray cluster's resources (``ray.cluster_resources()``), never
from the driver's hardware. Plain functions with no Ray import, so preflight and tests can
resolve a placement without starting Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import JobConfig

# Rows per model batch where the config leaves it open, by where the actor runs. On a GPU a
# batch must be large enough to keep it busy (H200: scoring 1125 pairs/s at 64, 1468 at 256,
# 1587 at 1024; captions 273/s at 128, 363 at 256, 408 at 512); on a CPU, small enough that a
# batch's activations stay modest and the pool's progress stays visible.
GPU_BATCH_SIZES = {"score": 256, "caption": 256}
CPU_BATCH_SIZES = {"score": 64, "caption": 16}


@dataclass(frozen=True)
class Resources:
    """Resolved per-stage placement: GPUs per actor and the device the model runs on."""

    score_gpus: float
    caption_gpus: float
    score_cpus: float
    caption_cpus: float
    score_device: str
    caption_device: str
    # Actor pool bounds (min, max); each pool autoscales between them.
    score_actors: tuple[int, int] = (1, 1)
    caption_actors: tuple[int, int] = (1, 1)
    score_batch_size: int = CPU_BATCH_SIZES["score"]
    caption_batch_size: int = CPU_BATCH_SIZES["caption"]


def _batch_size(configured: int | None, gpus: float, stage: str) -> int:
    if configured is not None:
        return configured
    return (GPU_BATCH_SIZES if gpus > 0 else CPU_BATCH_SIZES)[stage]


def _default_gpus(config: JobConfig, cluster_gpus: float) -> float:
    if config.device == "cpu":
        return 0.0
    if config.device == "cuda":
        return 1.0
    return 1.0 if cluster_gpus > 0 else 0.0


def _device(config: JobConfig, gpus: float) -> str:
    # An actor that reserved no GPU must not use one that another actor reserved.
    if config.device == "auto" and gpus == 0:
        return "cpu"
    return config.device


def _default_cpus(gpus: float, cluster_cpus: float, model_stages: int) -> float:
    # A GPU actor needs one CPU to feed it. A CPU actor on a small machine must leave
    # room for the read and decode tasks, or every CPU is held by idle actors waiting
    # for input that can never be produced.
    if gpus > 0:
        return 1.0
    return max(0.25, min(1.0, cluster_cpus / (2 * model_stages)))


def _fits(total: float, per_actor: float) -> int:
    # The epsilon keeps 1 / 0.1 from flooring to 9 through float error.
    return int(total / per_actor + 1e-9)


def _default_actors(gpus: float, cpus: float, cluster_gpus: float, cluster_cpus: float, model_stages: int) -> tuple[int, int]:
    """Start one actor and grow while work queues up. A GPU stage may grow to as many actors as
    the cluster's GPUs hold at ``gpus`` each (so one per GPU at 1.0, two per GPU at 0.5); a CPU
    stage to half the cluster's CPUs split between the model stages, the other half decoding."""
    if gpus > 0:
        return 1, max(1, _fits(cluster_gpus, gpus))
    return 1, max(1, _fits(cluster_cpus, 2 * model_stages * cpus))


def resolve_resources(config: JobConfig, cluster_gpus: float, cluster_cpus: float) -> Resources:
    """From the Ray cluster's resources (``ray.cluster_resources()``), never from the driver's hardware."""
    default = _default_gpus(config, cluster_gpus)
    score = default if config.score_gpus is None else config.score_gpus
    caption = default if config.caption_gpus is None else config.caption_gpus
    stages = 2 if config.captioning else 1
    score_cpus = _default_cpus(score, cluster_cpus, stages) if config.score_cpus is None else config.score_cpus
    caption_cpus = _default_cpus(caption, cluster_cpus, stages) if config.caption_cpus is None else config.caption_cpus
    score_actors = config.score_actors or _default_actors(score, score_cpus, cluster_gpus, cluster_cpus, stages)
    caption_actors = config.caption_actors or _default_actors(caption, caption_cpus, cluster_gpus, cluster_cpus, stages)
    return Resources(
        score_gpus=score,
        caption_gpus=caption,
        score_cpus=score_cpus,
        caption_cpus=caption_cpus,
        score_device=_device(config, score),
        caption_device=_device(config, caption),
        score_actors=tuple(score_actors),
        caption_actors=tuple(caption_actors),
        score_batch_size=_batch_size(config.score_batch_size, score, "score"),
        caption_batch_size=_batch_size(config.caption_batch_size, caption, "caption"),
    )
