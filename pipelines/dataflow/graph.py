"""Pipeline assembly: read -> decode -> score -> flag -> caption -> finalize, as a lazy Dataset."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import ray
from ray.data import ActorPoolStrategy

from ..commit import pieces
from ..config import JobConfig
from ..schema import EVIDENCE_SECONDS, output_schema, passthrough_schema
from ..vectors import extra_fields
from . import stages
from .resources import Resources

if TYPE_CHECKING:  # a type only: dataflow never imports the orchestration layer at run time
    from ..preflight import InputInfo


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
    ds = score_rows(ds, config, run_id, resources, passthrough, keep=[pieces.UNIT, pieces.ROW, EVIDENCE_SECONDS])
    return ds.map_batches(
        pieces.write_pieces,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"filesystem": filesystem, "staging": staging, "schema": output_schema(source.schema, image_column, extra_fields(config))},
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
        "max_image_bytes": config.max_image_bytes,
        "detect_language": config.text_languages is not None,
        "decode_device": config.decode_device,
        "http": config.http_settings(),
    }


def flag_kwargs(config: JobConfig) -> dict:
    return {
        "itm_threshold": config.itm_threshold,
        "itc_threshold": config.itc_threshold,
        "text_languages": config.text_languages,
        "labels": labels_json(config),
    }


def labels_json(config: JobConfig) -> str | None:
    """The label file as the stages take it (JSON text: hashable, plain config)."""
    from .labelling import as_json

    return as_json(config.labels)


def score_stage_kwargs(config: JobConfig, resources: Resources) -> dict:
    return {
        "model": config.itm_model,
        "device": resources.score_device,
        "max_text_tokens": config.max_text_tokens,
        "text_column": config.text_column,
        "precision": config.precision,
        "vision_attention": config.vision_attention,
        "cpu_kernels": config.cpu_kernels,
        "threads": resources.score_threads,
        "evidence": config.evidence,
        "evidence_layer": config.evidence_layer,
        "decode_device": config.decode_device,
        "shape_buckets": config.shape_buckets,
        "compile": config.torch_compile,
        "embeddings": config.embeddings,
        "labels": labels_json(config),
    }


def score_call_kwargs(config: JobConfig) -> dict:
    """Per-call arguments of the score stage: the thresholds that pick the rows ``flagged`` evidence explains."""
    return {"itm_threshold": config.itm_threshold, "itc_threshold": config.itc_threshold}


def caption_stage_kwargs(config: JobConfig, resources: Resources) -> dict:
    return {
        "model": config.caption_model,
        "device": resources.caption_device,
        "max_new_tokens": config.max_new_tokens,
        "prompt": config.caption_prompt,
        "policy": config.captions,
        "precision": config.precision,
        "text_column": config.text_column,
        "agreement_model": config.agreement_model if config.agreeing else None,
        "agreement_threshold": config.agreement_threshold,
        "threads": resources.caption_threads,
        "decode_device": config.decode_device,
        # auto on a GPU: Ray's batch is the most per call, and the actor fits its calls to free memory
        "rows_from_memory": resources.caption_batch_size
        if config.caption_batch_size is None and resources.caption_gpus > 0 else None,
    }


def finalize_kwargs(config: JobConfig, run_id: str, passthrough: list[str], keep=()) -> dict:
    return {
        "passthrough": passthrough,
        "run_id": run_id,
        "itm_model": config.itm_model,
        "caption_model": config.recorded_caption_model,
        "keep": list(keep),
        "extra": extra_fields(config),
    }


def overlapped(calls: int) -> dict:
    """ActorPoolStrategy arguments for ``calls`` concurrent calls per actor (Ray 2.60): the stage's own
    ``DeviceTurn`` keeps the model to one batch at a time, so the UDF itself may run in two threads."""
    if calls <= 1:
        return {}
    return {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True}


def _actor_pool(actors: tuple[int, int], calls: int, gpus: float, cpus: float) -> dict:
    """A model stage's ``map_batches`` placement: its autoscaling pool, reservations and restarts."""
    return {
        "compute": ActorPoolStrategy(min_size=actors[0], max_size=actors[1], **overlapped(calls)),
        "num_gpus": gpus,
        "num_cpus": cpus,
        **actor_retries(),
    }


def with_score_stage(ds: ray.data.Dataset, config: JobConfig, resources: Resources) -> ray.data.Dataset:
    """The scoring actor pool, as every graph that scores adds it."""
    return ds.map_batches(
        stages.ScoreStage,
        batch_format="pyarrow",
        batch_size=resources.score_batch_size,
        **_actor_pool(resources.score_actors, resources.score_calls, resources.score_gpus, resources.score_cpus),
        fn_constructor_kwargs=score_stage_kwargs(config, resources),
        fn_kwargs=score_call_kwargs(config),
        udf_modifying_row_count=False,
    )


def with_caption_stage(ds: ray.data.Dataset, config: JobConfig, resources: Resources, **overrides) -> ray.data.Dataset:
    """The captioning actor pool; ``overrides`` replace constructor arguments (the keyed plan's)."""
    return ds.map_batches(
        stages.CaptionStage,
        batch_format="pyarrow",
        batch_size=resources.caption_batch_size,
        **_actor_pool(resources.caption_actors, resources.caption_calls, resources.caption_gpus, resources.caption_cpus),
        fn_constructor_kwargs=dict(caption_stage_kwargs(config, resources), **overrides),
        udf_modifying_row_count=False,
    )


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
    ds = with_score_stage(ds, config, resources)
    ds = ds.map_batches(
        stages.flag_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=flag_kwargs(config),
        udf_modifying_row_count=False,
    )
    if config.captioning:
        ds = with_caption_stage(ds, config, resources)
    return ds.map_batches(
        stages.finalize_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=finalize_kwargs(config, run_id, passthrough, keep),
        udf_modifying_row_count=False,
    )
