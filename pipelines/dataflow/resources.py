"""Where each model stage runs: GPUs, CPUs, device, actor pool bounds and batch sizes.

Resolved from the config and the Ray cluster's resources (``ray.cluster_resources()``), never
from the driver's hardware. Plain functions with no Ray import, so preflight and tests can
resolve a placement without starting Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import ConfigError, JobConfig

# Rows per model batch where the config leaves it open, by where the actor runs. On a GPU a
# batch must be large enough to keep it busy (H200: scoring 1125 pairs/s at 64, 1468 at 256,
# 1587 at 1024; captions 273/s at 128, 363 at 256, 408 at 512); on a CPU, small enough that a
# batch's activations stay modest and the pool's progress stays visible.
log = logging.getLogger(__name__)

GPU_BATCH_SIZES = {"score": 256, "caption": 512}  # caption: the most per call; the actor fits it to free memory
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
    # Cores per actor (see model_threads): a CPU scoring actor runs that many chunks side by side, each
    # op on one thread (BlipScorer.chunk_workers); other actors give them to torch.set_num_threads.
    score_threads: int = 1
    caption_threads: int = 1
    # Concurrent calls per model actor (Ray's max_concurrent_calls_per_actor): 2 overlaps host work with the model's.
    score_calls: int = 1
    caption_calls: int = 1


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


# A GPU actor's CPU work is feeding the GPU (pixels to tensors, tokenizing): one or two threads.
GPU_ACTOR_THREADS = 1


def model_threads(gpus: float, configured_cpus: float | None, cluster_cpus: float, model_actors: int) -> int:
    """torch threads per model actor.

    Ray sets ``OMP_NUM_THREADS`` from an actor's ``num_cpus`` (floor, at least 1), so a CPU actor
    holding a fractional reservation (kept small so read and decode tasks always find a CPU)
    would run torch on one thread and leave cores idle: on 2 cores, 481 s for 1,000 pairs against
    the naive loop's 297 s on two threads. A default CPU actor therefore takes its share of all
    the cluster's cores, the model stages' largest pools together: decoding costs a few ms an
    image against more than 100 ms of model time, so it fits in the gaps. A reservation the user
    set is taken as the threads wanted (Ray's rule), and a GPU actor needs only a feeder thread.
    """
    if gpus > 0:
        return GPU_ACTOR_THREADS
    if configured_cpus is not None:
        return max(1, int(configured_cpus))
    return max(1, int(cluster_cpus) // max(1, model_actors))


def concurrent_calls(config: JobConfig, gpus: float) -> int:
    """Batches in flight per model actor: two with ``overlap`` on (``auto``: for actors with a GPU).

    On the CPU the model's torch threads already take the actor's cores, so a second batch's host
    work competes with them: two calls gained 0-6% on 2 cores (BENCHMARKS.md, "Overlapped batches"),
    within the noise, and the default stays one."""
    if config.overlap == "on" or (config.overlap == "auto" and gpus > 0):
        return 2
    return 1


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
    # CPU actors of both model stages at their largest pools share the cores.
    cpu_actors = (score_actors[1] if score == 0 else 0) + (caption_actors[1] if config.captioning and caption == 0 else 0)
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
        score_threads=model_threads(score, config.score_cpus, cluster_cpus, cpu_actors),
        caption_threads=model_threads(caption, config.caption_cpus, cluster_cpus, cpu_actors),
        score_calls=concurrent_calls(config, score),
        caption_calls=concurrent_calls(config, caption),
    )


# ---------------------------------------------------------------------------------------------
# does the plan fit the cluster?

# Ray Data's read, decode and write tasks each reserve one CPU (its default for a task).
TASK_CPUS = 1.0


class ResourceError(ConfigError):
    """The model actors' minimum pools leave the cluster unable to run the job: it would wait forever."""


@dataclass(frozen=True)
class _Pool:
    name: str  # "scoring" / "captioning": the flags are --score-* / --caption-*
    flag: str
    actors: int
    cpus: float
    gpus: float


def _pools(config: JobConfig, resources: Resources) -> list[_Pool]:
    pools = [_Pool("scoring", "score", resources.score_actors[0], resources.score_cpus, resources.score_gpus)]
    if config.captioning:
        pools.append(
            _Pool("captioning", "caption", resources.caption_actors[0], resources.caption_cpus, resources.caption_gpus)
        )
    return pools


def _number(value: float) -> str:
    return f"{value:g}"


def _pool_terms(pools: list[_Pool], kind: str) -> str:
    return " + ".join(f"{p.actors} {p.name} actor{'s' * (p.actors != 1)} x {_number(getattr(p, kind))}" for p in pools)


def _flags(pools: list[_Pool], kind: str) -> str:
    flags = [f"--{p.flag}-actors MIN (now {p.actors})" for p in pools]
    flags += [f"--{p.flag}-{kind} (now {_number(getattr(p, kind))})" for p in pools if getattr(p, kind)]
    return ", ".join(flags)


def resource_problem(config: JobConfig, resources: Resources, cluster_gpus: float, cluster_cpus: float) -> str | None:
    """Why the plan cannot run on a cluster of these CPUs and GPUs, or None when it can.

    Every actor of each model stage's minimum pool must be placed before rows flow, and the read,
    decode and write tasks still need a CPU each beside them. When the actors take every CPU (two
    1-CPU actors on a 2-CPU local Ray), no task is ever scheduled and the job waits forever,
    showing 0 rows; when they want more GPUs than there are, the pool never starts. Ray's own
    answer is a no-progress timeout after 30 minutes. (No stage reserves memory, so memory cannot
    starve a task this way.)
    """
    pools = _pools(config, resources)
    actor_cpus = sum(p.actors * p.cpus for p in pools)
    if cluster_cpus - actor_cpus < TASK_CPUS - 1e-9:
        left = max(0.0, cluster_cpus - actor_cpus)
        return (
            f"the model actors' minimum pools reserve {_pool_terms(pools, 'cpus')} = {_number(actor_cpus)} CPUs "
            f"of the cluster's {_number(cluster_cpus)}, leaving {_number(left)}; the read and decode tasks need "
            f"{_number(TASK_CPUS)} CPU each, so no row could ever be read and the job would wait forever. "
            f"Lower {_flags(pools, 'cpus')}, or run on a Ray with more CPUs"
        )
    gpu_pools = [p for p in pools if p.gpus > 0]
    actor_gpus = sum(p.actors * p.gpus for p in gpu_pools)
    if gpu_pools and actor_gpus > cluster_gpus + 1e-9:
        return (
            f"the model actors' minimum pools need {_pool_terms(gpu_pools, 'gpus')} = {_number(actor_gpus)} GPUs, "
            f"and the cluster has {_number(cluster_gpus)}: the actors could never start and the job would wait "
            f"forever. Lower {_flags(gpu_pools, 'gpus')}, pass --device cpu, or run on a Ray with more GPUs"
        )
    return None


def check_fits(config: JobConfig, resources: Resources, cluster_gpus: float, cluster_cpus: float) -> None:
    """Refuse (``ResourceError``, exit 2) a plan that cannot run on the local Ray this job uses.

    Called before any actor starts. A joined cluster (``ray_address``) may grow through its
    autoscaler, so there the same finding is a warning and the run goes ahead.
    """
    problem = resource_problem(config, resources, cluster_gpus, cluster_cpus)
    if problem is None:
        return
    if config.ray_address is None:
        raise ResourceError(f"cannot run on this machine's Ray: {problem}")
    log.warning("%s (unless the cluster's autoscaler adds nodes)", problem)
