"""Shared fixtures: tiny checkpoints built once, one Ray instance per test session, small catalogs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from tests.azure_server import azure_store, azurite_binary  # noqa: E402,F401  (fixture: Azure Blob on loopback)
from tests.gcs_server import gcs, gcs_store  # noqa: E402,F401  (fixtures: GCS on loopback)
from tests.s3_server import s3, s3_store  # noqa: E402,F401  (fixtures: S3 on loopback)


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require_or_skip(available: bool, reason: str) -> None:
    """A test whose tool (Chromium, Label Studio) is missing skips and says why; under CI=true it
    fails, so CI never goes green without the proof that test gives (.ci/run installs them)."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool fails the test instead of skipping it)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    from blip_ops.tiny import build_tiny_checkpoints

    itm, caption = build_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))
    return str(itm), str(caption)


@pytest.fixture(scope="session")
def tiny_itm(tiny_models) -> str:
    return tiny_models[0]


@pytest.fixture(scope="session")
def tiny_caption(tiny_models) -> str:
    return tiny_models[1]


@pytest.fixture(scope="session")
def tiny_itm_4_layers(tmp_path_factory) -> str:
    """The tiny ITM checkpoint with a 4-layer text encoder (the vision side as ``tiny_itm``'s): evidence
    can explain layers 1 and 2 of it, as production explains layer 6 of BLIP-base's 12."""
    from blip_ops.tiny import build_tiny_itm

    return str(build_tiny_itm(tmp_path_factory.mktemp("checkpoints") / "tiny-blip-itm-4-layers", text_layers=4))


@pytest.fixture(scope="session")
def ray_session(request):
    import ray

    # Ray's workers inherit the environment of the moment Ray starts: when any test in this
    # session uses the S3 store, start it (it sets the AWS_* variables) before Ray.
    if any("s3_store" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("s3_store")
    if any("gcs_store" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("gcs_store")
    # Without Azurite the Azure tests skip (fail under CI) on their own; Ray starts regardless.
    if azurite_binary() and any("azure_store" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("azure_store")
    # num_gpus=0: on a GPU host the suite runs as on CI (device auto then places actors on the CPU,
    # where the fidelity tests' fp32 references hold); GPU paths are measured by benchmarks/gpu_bench.py.
    # Ray 2.60 gives a new node's raylet 30 s to register (hard-coded in ray/_private/node.py); at
    # load 50 (six suites on 2 cores) that ran out once. A slow machine is not a failure: try again.
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
            break
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    yield ray
    ray.shutdown()


def image_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def write_catalog(directory: Path, records: list[dict], files: int = 2, schema: pa.Schema | None = None) -> Path:
    """Split ``records`` over ``files`` Parquet files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    per_file = max(1, -(-len(records) // files))
    for index in range(files):
        chunk = records[index * per_file:(index + 1) * per_file]
        if chunk or index == 0:
            table = pa.Table.from_pylist(chunk, schema=schema)
            pq.write_table(table, directory / f"part-{index}.parquet")
    return directory
