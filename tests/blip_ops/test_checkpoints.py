import json
import shutil

import pytest

from blip_ops.captioner import Blip2Captioner
from blip_ops.checkpoints import CAPTION, ITM, CheckpointError, inspect_checkpoint, is_local_reference, local_checkpoint
from blip_ops.scorer import BlipScorer


def test_hub_ids_and_paths_are_told_apart(tmp_path):
    assert not is_local_reference("Salesforce/blip-itm-base-coco")
    assert is_local_reference("/models/blip")
    assert is_local_reference("./blip")
    assert is_local_reference(str(tmp_path))
    assert not is_local_reference("s3://bucket/models/blip")  # fetched through the model cache
    assert local_checkpoint(str(tmp_path)) == str(tmp_path)  # local paths and hub ids pass through
    assert local_checkpoint("Salesforce/blip-itm-base-coco") == "Salesforce/blip-itm-base-coco"


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(str(tmp_path / "nope"), ITM)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(str(tmp_path), ITM)


def test_wrong_model_type_is_refused(tiny_caption, tiny_itm):
    with pytest.raises(CheckpointError, match="not a BLIP image-text retrieval checkpoint"):
        inspect_checkpoint(tiny_caption, ITM)
    with pytest.raises(CheckpointError, match="not a BLIP-2 captioning checkpoint"):
        inspect_checkpoint(tiny_itm, CAPTION)


def test_other_blip_head_is_refused(tiny_itm, tmp_path):
    copy = shutil.copytree(tiny_itm, tmp_path / "captioning-blip")
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["BlipForConditionalGeneration"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="BlipForImageTextRetrieval checkpoint is needed"):
        inspect_checkpoint(str(copy), ITM)


def test_pickle_only_weights_are_refused(tiny_itm, tmp_path):
    copy = shutil.copytree(tiny_itm, tmp_path / "pickled")
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        BlipScorer.from_pretrained(str(copy), device="cpu")


def test_uncached_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot resolve hub model"):
        inspect_checkpoint("nobody-here/not-a-model", ITM)


def test_cuda_request_without_gpu_is_refused(tiny_itm):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CheckpointError, match="no GPU"):
        BlipScorer.from_pretrained(tiny_itm, device="cuda")


def test_loaders_accept_tiny_checkpoints(tiny_itm, tiny_caption):
    import torch

    # auto is CUDA wherever this process sees a GPU (a GPU host), else the CPU (CI).
    assert BlipScorer.from_pretrained(tiny_itm, device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert Blip2Captioner.from_pretrained(tiny_caption, device="cpu").device == "cpu"
