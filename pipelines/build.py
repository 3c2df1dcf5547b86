"""Pipeline assembly: read -> decode -> score -> flag -> caption -> finalize, as a lazy Dataset."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import ray
from ray.data import ActorPoolStrategy

from . import pieces, stages
from .config import JobConfig
from .preflight import InputInfo
from .schema import output_schema, passthrough_schema


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


def _unfused() -> dict:
    """Giving decode a remote-args function keeps Ray from fusing it into the model actors:
    decoding stays on CPU tasks that scale on their own, and model actors only run models."""
    return {}


# Deliberate retry settings (Ray 2.60 defaults are unlimited for system failures):
# a task or actor whose worker process dies is retried or restarted this many times; a
# Python exception from a stage is not retried (bad rows never raise; anything that does
# is systemic). Past the limit the run fails, and rerunning it resumes from durable pieces.
TASK_RETRIES = 3
# Ray 2.60 takes retry limits only as extra remote args, deprecated from 2.64 (Ray is pinned to 2.60.x).
warnings.filterwarnings("ignore", message=".*`ray_remote_args` is deprecated.*")
ACTOR_RESTARTS = 3


def task_retries() -> dict:
    return {"max_retries": TASK_RETRIES, "retry_exceptions": False}


def actor_retries() -> dict:
    return {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}


def build_scored_dataset(
    config: JobConfig,
    source: InputInfo,
    run_id: str,
    resources: Resources,
    todo: dict[int, list[tuple[int, int]]],
    staging: str,
    filesystem,
) -> ray.data.Dataset:
    """Read the rows still to do (``todo``: row ranges per unit), score them, and write them as
    pieces into ``staging``; the dataset's rows are one per piece written."""
    image_column = None if config.image_uri_column else config.image_column
    passthrough = passthrough_schema(source.schema, image_column).names
    items = pieces.unit_items(source.units, todo)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        pieces.read_units,
        batch_format="pyarrow",
        batch_size=1,
        fn_kwargs={
            "filesystem": source.location.filesystem,
            "schema": source.schema,
            "batch_rows": config.decode_batch_size,
        },
        **task_retries(),
    )
    ds = score_rows(ds, config, run_id, resources, passthrough, keep=[pieces.UNIT, pieces.ROW])
    return ds.map_batches(
        pieces.write_pieces,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"filesystem": filesystem, "staging": staging, "schema": output_schema(source.schema, image_column)},
        **task_retries(),
    )


def decode_kwargs(config: JobConfig) -> dict:
    return {
        "text_column": config.text_column,
        "image_column": config.image_uri_column or config.image_column,
        "from_uri": bool(config.image_uri_column),
        "score_model": config.itm_model,
        "caption_model": config.caption_model if config.captioning else None,
        "jpeg_draft": config.jpeg_draft,
    }


def score_stage_kwargs(config: JobConfig, resources: Resources) -> dict:
    return {
        "model": config.itm_model,
        "device": resources.score_device,
        "max_text_tokens": config.max_text_tokens,
        "text_column": config.text_column,
        "precision": config.precision,
    }


def caption_stage_kwargs(config: JobConfig, resources: Resources) -> dict:
    return {
        "model": config.caption_model,
        "device": resources.caption_device,
        "max_new_tokens": config.max_new_tokens,
        "prompt": config.caption_prompt,
        "policy": config.captions,
        "precision": config.precision,
    }


def finalize_kwargs(config: JobConfig, run_id: str, passthrough: list[str], keep=()) -> dict:
    return {
        "passthrough": passthrough,
        "run_id": run_id,
        "itm_model": config.itm_model,
        "caption_model": config.recorded_caption_model,
        "keep": list(keep),
    }


def score_rows(
    ds: ray.data.Dataset,
    config: JobConfig,
    run_id: str,
    resources: Resources,
    passthrough: list[str],
    keep: list[str] = (),
) -> ray.data.Dataset:
    """decode -> score -> flag -> caption -> finalize over any dataset holding the configured columns;
    ``passthrough`` names the input columns kept in the output, ``keep`` working columns kept after them."""
    with warnings.catch_warnings():
        # Deprecated from Ray 2.64; with Ray pinned to 2.60 it is the supported way to prevent fusion.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = ds.map_batches(
            stages.decode_batch,
            batch_format="pyarrow",
            batch_size=config.decode_batch_size,
            ray_remote_args_fn=_unfused,
            fn_kwargs=decode_kwargs(config),
            udf_modifying_row_count=False,
            **task_retries(),
        )
    ds = ds.map_batches(
        stages.ScoreStage,
        batch_format="pyarrow",
        batch_size=resources.score_batch_size,
        compute=ActorPoolStrategy(min_size=resources.score_actors[0], max_size=resources.score_actors[1]),
        num_gpus=resources.score_gpus,
        num_cpus=resources.score_cpus,
        **actor_retries(),
        fn_constructor_kwargs=score_stage_kwargs(config, resources),
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        stages.flag_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"itm_threshold": config.itm_threshold, "itc_threshold": config.itc_threshold},
        udf_modifying_row_count=False,
    )
    if config.captioning:
        ds = ds.map_batches(
            stages.CaptionStage,
            batch_format="pyarrow",
            batch_size=resources.caption_batch_size,
            compute=ActorPoolStrategy(min_size=resources.caption_actors[0], max_size=resources.caption_actors[1]),
            num_gpus=resources.caption_gpus,
            num_cpus=resources.caption_cpus,
            **actor_retries(),
            fn_constructor_kwargs=caption_stage_kwargs(config, resources),
            udf_modifying_row_count=False,
        )
    return ds.map_batches(
        stages.finalize_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=finalize_kwargs(config, run_id, passthrough, keep),
        udf_modifying_row_count=False,
    )
