"""Checks that run before any model loads or any Ray worker starts: the input, the models, the output.

Every problem found here is a usage or input error (exit code 2) with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads

from blip_ops.agreement import inspect_agreement_model
from blip_ops.checkpoints import CAPTION, ITM, CheckpointError, inspect_checkpoint
from blip_ops.evidence import check_layer

from .commit import output
from .commit.delta import committer_for
from .commit.units import Unit, UnitError, fingerprint, plan_units, work_key
from .config import JobConfig
from .keys import run_key_models
from .reuse.sources import ReuseSourceError, open_sources
from .schema import OUTPUT_COLUMNS
from .storage import Location, locate, use_backend

# BlipTextConfig's default depth, for a config.json that leaves it out.
BLIP_TEXT_LAYERS = 12


class InputError(ValueError):
    """Bad input, model reference or output location; raised before any model loads."""


@dataclass(frozen=True)
class InputInfo:
    location: Location
    files: list[str]
    schema: pa.Schema
    num_rows: int
    base_dir: str
    units: list[Unit]
    fingerprint: list[list]
    reuse: tuple = ()  # pipelines.reuse.sources.ReuseSource, checked


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_null(type_)


def _is_binary(type_: pa.DataType) -> bool:
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_null(type_)


def input_dataset(location: Location) -> pads.FileSystemDataset:
    """The input's Parquet files; for a Delta table (a committed ``--output-format delta`` output),
    the files of its current version only, never the replaced ones kept for time travel."""
    from .commit.delta import committed_files, table_at

    table = table_at(location)
    if table is None:
        return pads.dataset(location.path, filesystem=location.filesystem, format="parquet", partitioning="hive")
    return pads.dataset(committed_files(table), filesystem=location.filesystem, format="parquet",
                        partitioning="hive", partition_base_dir=table.root.path)


def inspect_input(config: JobConfig) -> InputInfo:
    try:
        location = locate(config.input)
        info = location.filesystem.get_file_info(location.path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot access input {config.input}: {exc}") from None
    if info.type == pa.fs.FileType.NotFound:
        raise InputError(f"input does not exist: {config.input}")
    try:
        dataset = input_dataset(location)
        files = list(dataset.files)
        if not files:
            raise InputError(f"input holds no Parquet files: {config.input}")
        units = plan_units(dataset)
        num_rows = sum(unit.rows for unit in units)
        directory = location.path if info.type == pa.fs.FileType.Directory else None
        files_fingerprint = fingerprint(location.filesystem, files, directory) + run_key_models(config)
    except InputError:
        raise
    except UnitError as exc:
        raise InputError(f"input files disagree: {exc}") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"input is not readable as Parquet ({config.input}): {exc}") from None
    check_columns(dataset.schema, config)
    reuse = check_reuse(config)
    files_fingerprint += [s.identity for s in reuse]  # the resume key includes what was reused
    base_dir = location.path if info.type == pa.fs.FileType.Directory else location.path.rsplit("/", 1)[0]
    return InputInfo(location, files, dataset.schema, num_rows, base_dir, units, files_fingerprint, reuse)


def check_reuse(config: JobConfig) -> tuple:
    """Every --reuse source exists, is committed and lists readable files (exit 2 otherwise)."""
    try:
        return tuple(open_sources(config.reuse))
    except ReuseSourceError as exc:
        raise InputError(str(exc)) from None


def check_columns(schema: pa.Schema, config: JobConfig) -> None:
    def require(name: str, option: str, accepts, kind: str) -> None:
        if name not in schema.names:
            raise InputError(f"input has no column {name!r} (set by --{option}); columns: {', '.join(schema.names)}")
        type_ = schema.field(name).type
        if accepts is not None and not accepts(type_):
            raise InputError(f"column {name!r} must be {kind}, found {type_}")

    require(config.id_column, "id-column", None, "")
    require(config.text_column, "text-column", _is_string, "a string column")
    if config.image_uri_column:
        require(config.image_uri_column, "image-uri-column", _is_string, "a string column of paths or URIs")
        image_column = None
    else:
        require(config.image_column, "image-column", _is_binary, "a binary column of encoded image bytes")
        image_column = config.image_column
    categories = (config.labels or {}).get("categories")
    if categories:
        require(categories["column"], "labels (categories.column)", _is_string, "a string column of declared categories")
    clashes = [name for name in schema.names if name in OUTPUT_COLUMNS and name != image_column]
    if clashes:
        raise InputError(f"input columns {clashes} clash with output columns of the same name; rename them first")


def check_models(config: JobConfig) -> None:
    try:
        itm = inspect_checkpoint(config.itm_model, ITM)
        if config.captioning:
            inspect_checkpoint(config.caption_model, CAPTION)
        if config.agreeing:
            inspect_agreement_model(config.agreement_model)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    check_decode_device(config)
    if config.evidence != "none":
        try:
            evidence_layer(itm, config)
        except ValueError as exc:
            raise InputError(f"--evidence-layer: {exc}") from None


def check_decode_device(config: JobConfig) -> None:
    """--decode-device gpu needs torchvision's JPEG decoder where the job starts (the same image runs the actors)."""
    if config.decode_device == "gpu":
        from blip_ops.jpeg_device import torchvision_problem

        problem = torchvision_problem()
        if problem:
            raise InputError(problem)


def evidence_layer(itm_config: dict, config: JobConfig) -> int:
    """The ITM text-encoder layer evidence explains, from the checkpoint's config.json."""
    layers = (itm_config.get("text_config") or {}).get("num_hidden_layers", BLIP_TEXT_LAYERS)
    return check_layer(config.evidence_layer, int(layers))


Checked = tuple[InputInfo, Location]


def preflight(config: JobConfig) -> Checked:
    """Everything checkable without Ray or a model: the input, the models' configs, the output."""
    use_backend(config.storage_backend)
    source = inspect_input(config)
    check_models(config)
    try:
        committer = committer_for(config)
        destination = committer.prepare(config.output, config.overwrite, work_key(config, source.fingerprint))
    except (output.OutputError, OSError) as exc:
        raise InputError(str(exc)) from None
    return source, destination
