"""The decode workers' resize, read from the checkpoint's files without transformers, equals
what the checkpoint's processor computes; wherever the files do not say plainly, transformers decides."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_ops.checkpoints import CheckpointError, load_image_processor
from blip_ops.preprocess import Resize, check_resize_settings, resize_for

PROJECT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1), (1, 3000), (3000, 2), (360, 480), (17, 23), (384, 384), (224, 224)]


def _processor_resize(image_processor, rgb):
    """The reference: the checkpoint's processor with only its resize step on."""
    return image_processor(
        images=[rgb],
        do_convert_rgb=False,
        do_rescale=False,
        do_normalize=False,
        input_data_format="channels_last",
        return_tensors=None,
    )["pixel_values"][0]


@pytest.mark.parametrize("which", ["tiny_itm", "tiny_caption"])
def test_resize_equals_the_processors_pixel_for_pixel(which, request):
    reference = request.getfixturevalue(which)
    processor = load_image_processor(reference)
    resize = Resize.read(reference)
    assert resize == Resize.from_processor(processor)
    rng = np.random.RandomState(1)
    for height, width in SHAPES:
        rgb = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
        ours = resize.resize(rgb)
        assert ours.dtype == np.uint8 and ours.shape == (3, resize.height, resize.width)
        np.testing.assert_array_equal(ours, _processor_resize(processor, rgb))


def _write(directory: Path, name: str, content: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(content))


BLIP_SETTINGS = {
    "image_processor_type": "BlipImageProcessor",
    "do_resize": True,
    "size": 384,  # the int form older hub checkpoints use
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


def test_legacy_preprocessor_config_is_read_as_transformers_reads_it(tmp_path):
    _write(tmp_path, "preprocessor_config.json", BLIP_SETTINGS)
    assert Resize.read(str(tmp_path)) == Resize(384, 384, 3) == Resize.from_processor(load_image_processor(str(tmp_path)))


def test_nested_processor_config_wins_over_the_legacy_file_as_in_transformers(tmp_path):
    _write(tmp_path, "preprocessor_config.json", BLIP_SETTINGS)
    _write(tmp_path, "processor_config.json", {"image_processor": dict(BLIP_SETTINGS, size={"height": 224, "width": 240}, resample=2)})
    assert Resize.read(str(tmp_path)) == Resize(224, 240, 2) == Resize.from_processor(load_image_processor(str(tmp_path)))


@pytest.mark.parametrize(
    "change",
    [
        {"resample": None},  # missing: the class default applies, which only transformers knows
        {"size": {"shortest_edge": 384}},
        {"do_center_crop": True, "crop_size": {"height": 300, "width": 300}},
        {"image_processor_type": "CLIPImageProcessor"},
        {"do_resize": None},
    ],
)
def test_settings_not_plainly_blips_are_left_to_transformers(tmp_path, change):
    settings = {k: v for k, v in dict(BLIP_SETTINGS, **change).items() if v is not None}
    _write(tmp_path, "preprocessor_config.json", settings)
    assert Resize.read(str(tmp_path)) is None


def test_resize_for_falls_back_to_the_processor(tmp_path):
    settings = {k: v for k, v in BLIP_SETTINGS.items() if k != "resample"}
    _write(tmp_path, "preprocessor_config.json", settings)
    processor = load_image_processor(str(tmp_path))
    assert resize_for(str(tmp_path)) == Resize.from_processor(processor) == Resize(384, 384, int(processor.resample))


def test_preprocessing_blip_cannot_take_is_refused(tmp_path):
    _write(tmp_path, "preprocessor_config.json", dict(BLIP_SETTINGS, size={"shortest_edge": 384}))
    with pytest.raises(CheckpointError, match="fixed height and width"):
        resize_for(str(tmp_path))


def test_a_model_actor_refuses_files_that_disagree_with_its_processor(tiny_itm):
    processor = load_image_processor(tiny_itm)
    check_resize_settings(tiny_itm, processor)  # agrees
    processor.resample = 2
    with pytest.raises(CheckpointError, match="differ from the ones transformers loaded"):
        check_resize_settings(tiny_itm, processor)


def _hub_cache(root: Path, repo: str, files: dict, missing: list[str]) -> None:
    """The layout huggingface_hub writes: refs/main, snapshots/<sha>/, .no_exist/<sha>/."""
    sha = "0" * 40
    cache = root / ("models--" + repo.replace("/", "--"))
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(sha)
    for name, content in files.items():
        _write(cache / "snapshots" / sha, name, content)
    for name in missing:
        (cache / ".no_exist" / sha).mkdir(parents=True, exist_ok=True)
        (cache / ".no_exist" / sha / name).touch()


def test_hub_checkpoints_are_read_from_the_local_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _hub_cache(tmp_path, "acme/known", {"preprocessor_config.json": BLIP_SETTINGS}, missing=["processor_config.json"])
    _hub_cache(tmp_path, "acme/unknown", {"preprocessor_config.json": BLIP_SETTINGS}, missing=[])
    assert Resize.read("acme/known") == Resize(384, 384, 3)
    # Whether processor_config.json exists is not known, so neither is which file wins.
    assert Resize.read("acme/unknown") is None
    assert Resize.read("acme/not-cached") is None


def test_decode_workers_never_import_torch_or_transformers(tiny_itm, tiny_caption):
    """Decode, flag and write tasks import pipelines.dataflow.stages; torch would cost each worker seconds and hundreds of MB."""
    script = f"""
import sys
import pyarrow as pa
from pipelines.dataflow.stages import decode_batch, flag_batch, finalize_batch
from pipelines.commit.pieces import read_units, write_pieces
from tests.conftest import image_bytes
from PIL import Image
batch = pa.table({{"text": ["a red square"], "image": [image_bytes(Image.new("RGB", (40, 30), (255, 0, 0)))]}})
out = decode_batch(batch, text_column="text", image_column="image", from_uri=False,
                   score_model={tiny_itm!r}, caption_model={tiny_caption!r}, detect_language=True,
                   max_image_bytes=10**6)
from pipelines import schema as S
assert out.column(S.IMAGE_ERROR).to_pylist() == [None]
assert out.column(S.PIXELS_SCORE).is_valid().to_pylist() == [True]
assert out.column(S.PIXELS_CAPTION).is_valid().to_pylist() == [True]
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
