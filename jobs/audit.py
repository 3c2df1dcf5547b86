"""Notebook audits: score a sample of a catalog into a pandas DataFrame, and look at what got flagged.

    >>> from jobs.audit import audit, show_flagged
    >>> df = audit("s3://bucket/catalog/", sample=50, where="category == 'shoes'",
    ...            itm_model="Salesforce/blip-itm-base-coco", captions="flagged")
    >>> show_flagged(df)          # in Jupyter: thumbnails, text, caption, scores, reasons

``audit`` runs the same stages as ``jobs.score`` (decode -> score -> flag -> caption ->
finalize) on a local Ray it starts when none is running (or ``ray_address=``), with models
loaded in the actors, never in the notebook process.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import JobConfig, build_config
from pipelines.preflight import check_columns, check_models, check_reuse, input_dataset, inspect_input
from pipelines.review import views
from pipelines.schema import passthrough_schema
from pipelines.storage import read_bytes

# Keeps input order through Ray (which may reorder blocks) so each result row finds its image again.
_ROW = "__audit_row"
# Stands in for the CLI's required --output: an audit writes nothing.
_NO_OUTPUT = "<audit: in memory>"
_DATAFRAME_INPUT = "<pandas.DataFrame>"
# Options that make no sense for an in-memory audit.
_NOT_FOR_AUDIT = ("input", "output", "overwrite")
# Where audit() records the column names show_flagged needs.
ATTRS_KEY = "blip_moderate"


def audit(
    source, *, sample: int | None = None, where=None, seed: int = 0, warm_models: bool = True, **options
) -> pd.DataFrame:
    """Score ``source`` and return one row per selected record, in input order.

    ``source``: a Parquet path or ``s3://`` URI (as ``--input``), or a pandas DataFrame whose
    image column holds encoded bytes (or, with ``image_uri_column=``, paths/URIs) plus a text
    and an id column.

    ``where`` restricts rows before sampling, in one of two forms, either evaluated over every
    column but the image bytes:
      - a string in ``pandas.DataFrame.query`` syntax, e.g. ``"category == 'shoes' and price > 10"``;
      - a ``pyarrow.compute`` expression, e.g. ``pc.field("category") == "shoes"`` (evaluated by
        Arrow, without a pandas conversion: the quicker one on a large catalog).
    On a Parquet source the rows are found row group by row group without reading any image
    bytes; images are read only from the row groups that hold a sampled row.

    ``sample=n`` keeps ``n`` rows drawn without replacement, the same rows for the same ``seed``.

    ``options`` are the CLI's options with underscores (``itm_model=``, ``caption_model=``,
    ``captions=``, ``itm_threshold=``, ``device=``, ``ray_address=``...), validated like
    ``--config``: a mistyped name raises ``ConfigError`` naming it.

    ``warm_models`` (default): up to ``pipelines.dataflow.warm.WARM_MAX_ROWS`` rows are scored by model
    actors kept alive between calls, so only the first audit with given models and settings
    pays for loading them; ``release_models()`` stops them (and frees their GPUs). Larger
    audits, or ``warm_models=False``, run the batch pipeline, whose actors end with the call.

    The result has the CLI's output columns in the same order (``df[cli_columns]``), plus, for
    byte images, the image column itself as the last column, so ``show_flagged`` can draw
    thumbnails (with ``image_uri_column`` the URI column is already there).
    """
    for name in _NOT_FOR_AUDIT:
        if name in options:
            raise TypeError(f"audit() does not take {name}=: it scores `source` and returns a DataFrame")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 0):
        raise ValueError(f"sample must be a non-negative int, got {sample!r}")
    is_frame = isinstance(source, pd.DataFrame)
    config = build_config(dict(options, input=_DATAFRAME_INPUT if is_frame else str(source), output=_NO_OUTPUT))
    check_models(config)  # a wrong model path fails in a second, before Ray starts
    reuse = check_reuse(config)  # so does a --reuse source that does not exist or is not committed
    return _score(select_rows(source, config, sample=sample, where=where, seed=seed), config, warm_models, reuse)


def select_rows(source, config: JobConfig, *, sample: int | None = None, where=None, seed: int = 0) -> pa.Table:
    """The rows ``audit`` scores: ``where`` applied, then the seeded sample, in input order."""
    if isinstance(source, pd.DataFrame):
        return _select_frame(source, config, sample, where, seed)
    return _select_path(config, sample, where, seed)


def _image_column(config: JobConfig) -> str | None:
    """The bytes column the stages drop (a URI column is an ordinary passthrough column)."""
    return None if config.image_uri_column else config.image_column


def _sample_positions(count: int, sample: int | None, seed: int) -> np.ndarray:
    if sample is None or sample >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))


def _query_positions(frame: pd.DataFrame, where: str) -> np.ndarray:
    """Positions (not labels) of the rows a ``DataFrame.query`` string keeps."""
    framed = frame.reset_index(drop=True)
    return framed.query(where).index.to_numpy()


def _check_where(where) -> None:
    if where is not None and not isinstance(where, (str, pc.Expression)):
        raise TypeError(f"where must be a DataFrame.query string or a pyarrow.compute expression, got {type(where).__name__}")


def _select_frame(frame: pd.DataFrame, config: JobConfig, sample, where, seed) -> pa.Table:
    _check_where(where)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    check_columns(table.schema, config)  # InputError naming a missing or mistyped column
    if isinstance(where, str):
        image = _image_column(config)
        table = table.take(_query_positions(frame.drop(columns=[image] if image else []), where))
    elif where is not None:
        table = table.filter(where)
    return table.take(_sample_positions(table.num_rows, sample, seed))


def _select_path(config: JobConfig, sample, where, seed) -> pa.Table:
    """Two passes, so a sample of a large catalog reads little: the first finds the rows ``where``
    keeps, row group by row group, without the image bytes (no filter: from the metadata alone);
    the second reads whole rows only from the row groups holding a sampled row."""
    _check_where(where)
    source = inspect_input(config)  # the CLI's input checks: exists, Parquet, columns and types
    dataset = input_dataset(source.location)  # a Delta table: its current files only
    image = _image_column(config)
    meta = [name for name in dataset.schema.names if name != image]
    groups, kept = [], []
    for fragment in dataset.get_fragments():
        for group in fragment.split_by_row_group():
            groups.append(group)
            kept.append(_kept_rows(group, dataset.schema, meta, where))
    offsets = np.cumsum([0] + [len(rows) for rows in kept])
    chosen = _sample_positions(int(offsets[-1]), sample, seed)
    parts = []
    for index, group in enumerate(groups):
        mine = chosen[(chosen >= offsets[index]) & (chosen < offsets[index + 1])] - offsets[index]
        if len(mine):
            parts.append(group.to_table(schema=dataset.schema).take(kept[index][mine]))
    return pa.concat_tables(parts) if parts else dataset.schema.empty_table()


def _kept_rows(group, schema: pa.Schema, meta: list[str], where) -> np.ndarray:
    """Positions within one row group of the rows ``where`` keeps."""
    if where is None:
        return np.arange(sum(info.num_rows for info in group.row_groups))
    table = group.to_table(columns=meta, schema=schema)
    if isinstance(where, str):
        return _query_positions(table.to_pandas(), where)
    positions = table.append_column(_ROW, pa.array(np.arange(table.num_rows), pa.int64())).filter(where)
    return positions.column(_ROW).to_numpy()


def _new_run_id() -> str:
    return "audit-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _reused_rows(table: pa.Table, config: JobConfig, resources, run_id: str, passthrough: list[str], sources):
    """Split off the rows a source holds everything for (scores, and the caption when captioning): they are
    built from the reused values, with flags recomputed at this audit's thresholds, and never reach a model.
    A row with only part of its values found is computed whole."""
    from pipelines import schema as S
    from pipelines.dataflow import dedup, stages
    from pipelines.reuse.lookup import lookup

    found = lookup(table, config, dedup.content_digests(config, resources), list(sources))
    whole = found.column("__scores_found")
    if config.labels is not None:  # labels are not looked up here: every row goes to the model for them
        whole = pa.array([False] * table.num_rows)
    if config.captioning:
        whole = pc.and_(whole, found.column("__caption_found"))
    rest = table.filter(pc.invert(whole))
    reused = table.filter(whole)
    values = found.filter(whole).drop_columns(["__scores_found", "__caption_found"])
    image = _image_column(config)
    if image:
        reused = reused.drop_columns([image])
    for name in values.column_names:
        reused = reused.append_column(name, values.column(name))
    n = reused.num_rows
    reused = reused.append_column(S.IMAGE_ERROR, pa.nulls(n, pa.string())).append_column(S.TEXT_ERROR, pa.nulls(n, pa.string()))
    if not config.captioning:
        reused = reused.drop_columns(["caption", "caption_from_run"])
    if config.text_languages is not None and n:
        from blip_ops.language import detect_languages

        reused = reused.append_column(S.TEXT_LANGUAGE, pa.array(detect_languages(reused.column(config.text_column).to_pylist()), pa.string()))
    from pipelines.dataflow.graph import finalize_kwargs, flag_kwargs

    # Flags as a fresh audit gives them, language check included; evidence and caption agreement are
    # not computed for reused rows (null): they need the models this path exists to skip.
    flagged = stages.flag_batch(reused, **flag_kwargs(config))

    return rest, (stages.finalize_batch(flagged, **finalize_kwargs(config, run_id, passthrough)) if n else None)


def _score(table: pa.Table, config: JobConfig, warm_models: bool = True, reuse=()) -> pd.DataFrame:
    import ray

    from pipelines.dataflow import runtime, warm
    from pipelines.dataflow.graph import score_rows
    from pipelines.dataflow.resources import check_fits, resolve_resources

    image = _image_column(config)
    images = table.column(image) if image else None
    table = table.append_column(_ROW, pa.array(np.arange(table.num_rows), pa.int64()))
    passthrough = passthrough_schema(table.schema, image).names
    runtime.connect(config.ray_address)
    resources = resolve_resources(config, runtime.cluster_gpus(), runtime.cluster_cpus())
    run_id = config.run_id or _new_run_id()
    everything, reused = table, None
    # With embeddings asked for, an audit scores its rows itself: its in-memory lookup takes the scores only.
    if reuse and table.num_rows and config.embeddings == "none":
        table, reused = _reused_rows(table, config, resources, run_id, passthrough, reuse)
    if 0 < table.num_rows <= warm.WARM_MAX_ROWS and warm_models:
        scored = warm.warm_stages(config, resources).run(table, run_id, passthrough)
    elif table.num_rows:
        check_fits(config, resources, runtime.cluster_gpus(), runtime.cluster_cpus())  # the pools must leave decode a CPU
        runtime.expect_rows(table.num_rows)
        dataset = score_rows(ray.data.from_arrow(table), config, run_id, resources, passthrough)
        scored = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    else:
        scored = None
    if reused is not None:
        scored = reused if scored is None else pa.concat_tables([scored, reused.cast(scored.schema)])
    from pipelines.vectors import extra_fields

    if scored is not None and config.near_duplicates:
        scored = _with_groups(scored, config)
    result = _finish(everything, scored, passthrough, image, images, extra_fields(config))
    result.attrs[ATTRS_KEY] = {
        "run_id": run_id,
        "id_column": config.id_column,
        "text_column": config.text_column,
        "image_column": config.image_uri_column or config.image_column,
        "image_is_uri": bool(config.image_uri_column),
        "category_column": ((config.labels or {}).get("categories") or {}).get("column"),
    }
    return result


def _with_groups(scored: pa.Table, config: JobConfig) -> pa.Table:
    """``image_group`` and ``image_group_size`` over the audit's rows (``neardup.group_in_memory``: the
    rows are in this process already, so no passes over files)."""
    from pipelines import schema as S
    from pipelines.dataflow.neardup import group_in_memory
    from pipelines.vectors import to_numpy

    matrix, valid = to_numpy(scored.column(S.IMAGE_EMBEDDING))
    groups, sizes = group_in_memory(scored.column("image_sha256").to_pylist(), matrix, valid, config.near_duplicate_cosine)
    for name, values, type_ in ((S.IMAGE_GROUP, groups, pa.string()), (S.IMAGE_GROUP_SIZE, sizes, pa.int32())):
        scored = scored.set_column(scored.schema.get_field_index(name), pa.field(name, type_), pa.array(values, type_))
    return scored


def _finish(table: pa.Table, scored: pa.Table | None, passthrough: list[str], image: str | None, images, extra=()) -> pd.DataFrame:
    from pipelines.schema import output_schema

    schema = output_schema(table.schema, image, extra)
    if scored is None:
        scored = schema.empty_table()
    scored = scored.take(pc.sort_indices(scored.column(_ROW)))
    if images is not None:
        # Rows come back sorted by their input position, which indexes ``images`` directly.
        scored = scored.append_column(image, images.take(scored.column(_ROW)))
    frame = scored.drop_columns([_ROW]).to_pandas()
    return frame


# ---------------------------------------------------------------------------------------------
# show_flagged


class FlaggedView:
    """Jupyter renders it with ``_repr_html_``; ``str(view)`` is the HTML, ``view.rows`` the shown rows."""

    def __init__(self, html: str, rows: list[dict]):
        self.html = html
        self.rows = rows

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"<FlaggedView: {len(self.rows)} rows>"


def _column_names(df: pd.DataFrame, id_column, text_column, image_column) -> tuple[str, str, str | None, bool]:
    recorded = df.attrs.get(ATTRS_KEY, {})
    image = image_column or recorded.get("image_column") or "image"
    return (
        id_column or recorded.get("id_column", "id"),
        text_column or recorded.get("text_column", "text"),
        image if image in df.columns else None,
        bool(recorded.get("image_is_uri")) if image_column is None else None,
    )


def _image_bytes(value, is_uri: bool | None) -> bytes | None:
    """Bytes for a thumbnail: the value itself, or read from its path/URI (``is_uri`` None: strings are URIs)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if is_uri is None:
        is_uri = isinstance(value, str)
    if is_uri:
        try:
            return read_bytes(str(value))
        except (OSError, ValueError):
            return None
    return bytes(value)


def _present(value):
    """None for pandas' missing values (NaN, None, NA), so a missing caption or error shows nothing."""
    if value is None or (not isinstance(value, (dict, list, np.ndarray)) and pd.isna(value)):
        return None
    return value


def _label_fields(record, category_column) -> dict:
    labels = _present(record.get("labels"))
    if labels is None:
        return {}
    return {
        "labels": [dict(item) for item in labels],
        "category_predicted": _present(record.get("category_predicted")),
        "category_score": _present(record.get("category_score")),
        "category_rank": _present(record.get("category_rank")),
        "category": _present(record.get(category_column)) if category_column else None,
    }


def show_flagged(df: pd.DataFrame, n: int = 20, *, id_column=None, text_column=None, image_column=None) -> FlaggedView:
    """The ``n`` most confidently flagged rows as an HTML table of thumbnails, text, caption, scores and reasons,
    with the evidence heat map over the image and its top words where the row has evidence
    (``blip_ops.heatmap.overlay(image, df.evidence[i])`` draws it for any row).

    Order: scored rows by ascending ``itm_score`` (then ``itc_score``), then the rows that could
    not be checked (image or text errors). Column names come from the ``audit`` result; pass them
    for a DataFrame read some other way (a string image column is read as paths/URIs). Every
    catalog value is HTML-escaped.
    """
    id_col, text_col, image_col, is_uri = _column_names(df, id_column, text_column, image_column)
    flagged = df[df["flagged"].astype(bool)]
    order = flagged.sort_values(["itm_score", "itc_score"], na_position="last", kind="stable").head(n)
    rows = []
    for _, record in order.iterrows():
        data = _image_bytes(record[image_col], is_uri) if image_col else None
        evidence = _present(record.get("evidence"))
        rows.append({
            "id": _present(record.get(id_col)),
            "text": _present(record.get(text_col)),
            "caption": _present(record.get("caption")),
            "itm_score": record.get("itm_score"),
            "itc_score": record.get("itc_score"),
            "status": _present(record.get("status")),
            "error": _present(record.get("error")),
            "flag_reasons": list(record.get("flag_reasons") if record.get("flag_reasons") is not None else []),
            "thumbnail": views.thumbnail_uri(data),
            "evidence": evidence,
            "overlay": views.overlay_uri(data, evidence),
            # --labels: the row's labels and its declared category (``category`` column, if any)
            **_label_fields(record, (df.attrs.get(ATTRS_KEY) or {}).get("category_column")),
        })
    caption = f"{len(rows)} of {len(flagged)} flagged rows ({len(df)} audited)"
    html = (
        f"<style>{views.ROWS_CSS}</style><div class=\"bm-flagged\"><p>{views.esc(caption)}</p>"
        f"{views.rows_table(rows)}</div>"
    )
    return FlaggedView(html, rows)


def release_models() -> int:
    """Stop the warm model actors ``audit`` keeps between calls; returns how many sets were stopped."""
    from pipelines.dataflow import warm

    return warm.release()


__all__ = ["audit", "release_models", "select_rows", "show_flagged", "FlaggedView"]
