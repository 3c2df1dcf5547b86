"""One run through Ray with --decode-device gpu (the keyed plan, captions on), on the CPU: the actors
decode the JPEGs the decode tasks shipped, every row keeps its status, and the scores stay within a
few thousandths of the checkpoint's own (Hugging Face on Pillow's pixels)."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.samples import photo
from blip_ops import jpeg_device
from blip_ops.samples import sample_catalog
from pipelines.config import build_config
from pipelines.dataflow import graph
from pipelines.run import run_job
from tests.conftest import write_catalog
from tests.reference import itm_reference


def _rotated() -> bytes:
    image = Image.open(io.BytesIO(photo(96, 64, seed=2)))
    exif = image.getexif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def _cmyk() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 180, 200, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_gpu_decoding_run_through_ray(ray_session, tiny_itm, tiny_caption, tmp_path, monkeypatch):
    records = sample_catalog(12, seed=4)
    records += [
        {"id": "rotated", "text": "a photo", "image": _rotated(), "expected": "match"},
        {"id": "cmyk", "text": "a cmyk square", "image": _cmyk(), "expected": "match"},
        {"id": "truncated", "text": "a broken photo", "image": photo(64, 48, seed=9)[:700], "expected": "image_error"},
    ]
    catalog = write_catalog(tmp_path / "catalog", [{k: v for k, v in r.items() if k != "expected"} for r in records], files=1)
    # The actors get the Pillow stand-in (torchvision does not load beside this CPU torch); the driver builds their arguments.
    monkeypatch.setattr(jpeg_device, "torchvision_problem", lambda: None)
    for name in ("score_stage_kwargs", "caption_stage_kwargs"):
        monkeypatch.setattr(graph, name, lambda *a, _f=getattr(graph, name): dict(_f(*a), jpeg_backend="pil"))
    config = build_config(dict(
        input=str(catalog), output=str(tmp_path / "out"), itm_model=tiny_itm, caption_model=tiny_caption, device="cpu",
        max_new_tokens=4, agreement_model="none", score_batch_size=4, caption_batch_size=4, decode_batch_size=5,
        decode_device="gpu",
    ))
    summary = run_job(config)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert summary.rows_written == len(records) == len(rows)
    reference = itm_reference(tiny_itm)
    scored, moved = 0, 0
    for record in records:
        row = rows[record["id"]]
        expected = record["expected"] if record["expected"] in ("image_error", "text_error") else "ok"
        assert row["status"] == expected, record["id"]
        assert (row["caption"] is None) == (expected == "image_error"), record["id"]
        if expected == "ok":
            itc, itm = reference(record["image"], record["text"])
            assert row["itc_score"] == pytest.approx(itc, abs=5e-3) and row["itm_score"] == pytest.approx(itm, abs=5e-3)
            scored += 1
            moved += abs(row["itm_score"] - itm) > 1e-6  # torch's resize, not Pillow's: the actors decoded it
    assert scored >= 10 and moved >= 1
    assert rows["truncated"]["error"].startswith("corrupt or truncated image")
