"""--decode-device gpu through the stage classes, without Ray, on the CPU (the Pillow stand-in backend):
the decode task ships JPEG bytes, each model actor decodes them, errors follow the CPU path's rules,
and the numbers stay close to CPU decoding's."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from benchmarks.samples import photo
from pipelines import schema as S
from pipelines.dataflow import stages
from pipelines.dataflow.stages import CaptionStage, ScoreStage, decode_batch, finalize_batch, flag_batch
from pipelines.reuse import passes as P


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _rotated() -> bytes:
    image = Image.open(io.BytesIO(photo(120, 80, seed=7)))
    exif = image.getexif()
    exif[0x0112] = 6
    return _jpeg(image, exif=exif.tobytes(), quality=95)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo(90, 70, seed=3))).save(buffer, "PNG")
    return buffer.getvalue()


TRUNCATED = photo(96, 72, seed=4)[:900]
ROWS = [  # (what, image, text)
    ("jpeg", photo(160, 120, seed=1), "a photo of shapes"),
    ("rotated jpeg", _rotated(), "a rotated photo"),
    ("png", _png(), "a png photo"),
    ("cmyk jpeg", _jpeg(Image.new("CMYK", (64, 48), (0, 200, 30, 10))), "a cmyk square"),
    ("truncated jpeg", TRUNCATED, "a broken photo"),
    ("junk", b"not an image", "junk"),
    ("jpeg, blank text", photo(100, 90, seed=5), "   "),
    ("missing", None, "nothing"),
]


def _batch():
    return pa.table({"id": [r[0] for r in ROWS], "image": pa.array([r[1] for r in ROWS], pa.binary()), "text": [r[2] for r in ROWS]})


def _decode(device, itm, caption):
    return decode_batch(
        _batch(), text_column="text", image_column="image", from_uri=False, score_model=itm, caption_model=caption,
        decode_device=device,
    )


def test_the_decode_task_ships_plain_jpegs_as_bytes_and_decodes_the_rest(tiny_itm, tiny_caption):
    cpu, gpu = _decode("cpu", tiny_itm, tiny_caption), _decode("gpu", tiny_itm, tiny_caption)
    assert S.JPEG_SCORE not in cpu.column_names
    shipped = [b is not None for b in gpu.column(S.JPEG_SCORE).to_pylist()]
    assert shipped == [True, True, False, False, False, False, True, False]  # not the CMYK or the truncated one
    assert gpu.column(S.JPEG_CAPTION).to_pylist() == gpu.column(S.JPEG_SCORE).to_pylist()
    assert gpu.column(S.JPEG_ORIENTATION).to_pylist() == [1, 6, None, None, None, None, 1, None]
    assert [p is None for p in gpu.column(S.PIXELS_SCORE).to_pylist()] == [s or c is None for s, c in zip(shipped, cpu.column(S.PIXELS_SCORE).to_pylist())]
    # Rows decoded here get the CPU path's pixels and the same errors.
    for column in (S.PIXELS_SCORE, S.PIXELS_CAPTION):
        assert [v for v, s in zip(gpu.column(column).to_pylist(), shipped) if not s] == [
            v for v, s in zip(cpu.column(column).to_pylist(), shipped) if not s
        ]
    assert gpu.column(S.IMAGE_ERROR).to_pylist() == cpu.column(S.IMAGE_ERROR).to_pylist()
    assert _decode("gpu", tiny_itm, None).column(S.JPEG_CAPTION).null_count == len(ROWS)


def _stages(itm, caption, device):
    score = ScoreStage(model=itm, device="cpu", max_text_tokens=35, text_column="text", decode_device=device, jpeg_backend="pil")
    captioner = CaptionStage(model=caption, device="cpu", max_new_tokens=4, prompt=None, policy="all", decode_device=device, jpeg_backend="pil")
    return score, captioner


def _run(device, itm, caption):
    score, captioner = _stages(itm, caption, device)
    scored = score(_decode(device, itm, caption))
    assert S.JPEG_SCORE not in scored.column_names and S.PIXELS_SCORE not in scored.column_names
    flagged = flag_batch(scored, itm_threshold=0.5, itc_threshold=0.2)
    out = finalize_batch(captioner(flagged), passthrough=["id", "text"], run_id="r", itm_model="m", caption_model="c")
    return out


def test_gpu_decoding_gives_the_same_rows_statuses_and_errors_and_close_scores(tiny_itm, tiny_caption):
    cpu, gpu = _run("cpu", tiny_itm, tiny_caption), _run("gpu", tiny_itm, tiny_caption)
    assert gpu.column_names == cpu.column_names and gpu.num_rows == len(ROWS)
    for name in ("id", "status", "error", "flag_reasons", "text_truncated"):
        assert gpu.column(name).to_pylist() == cpu.column(name).to_pylist(), name
    assert gpu.column("status").to_pylist() == ["ok"] * 4 + ["image_error"] * 2 + ["text_error", "image_error"]
    assert [c is None for c in gpu.column("caption").to_pylist()] == [c is None for c in cpu.column("caption").to_pylist()]
    for name in ("itc_score", "itm_score"):
        a, b = (np.array(t.column(name).to_pylist(), dtype=float) for t in (cpu, gpu))
        assert np.array_equal(np.isnan(a), np.isnan(b))
        # Pixels moved by torch's resize (a fraction of a level on average): scores move a little, not a lot.
        assert np.nanmax(np.abs(a - b)) < 0.02, name
        assert np.nanmax(np.abs(a - b)) > 0  # the JPEG rows really took the other path


def test_the_score_actor_turns_an_undecodable_shipped_jpeg_into_the_cpu_paths_error(tiny_itm, tiny_caption):
    """A JPEG whose headers pass but that neither decoder reads: the same image_error the decode task
    gives it, and the caption actor is spared it."""
    decoded = _decode("gpu", tiny_itm, tiny_caption)
    broken = pa.array([TRUNCATED] * 2 + [None] * (len(ROWS) - 2), pa.binary())
    for column in (S.JPEG_SCORE, S.JPEG_CAPTION):
        decoded = decoded.set_column(decoded.schema.get_field_index(column), column, broken)
    score, captioner = _stages(tiny_itm, tiny_caption, "gpu")
    scored = score(decoded)
    expected = _decode("cpu", tiny_itm, tiny_caption).column(S.IMAGE_ERROR).to_pylist()[4]
    assert scored.column(S.IMAGE_ERROR).to_pylist()[:2] == [expected, expected]
    assert scored.column("itc_score").to_pylist()[:2] == [None, None]
    assert scored.column(S.JPEG_CAPTION).to_pylist()[:2] == [None, None]
    assert flag_batch(scored, itm_threshold=0.5, itc_threshold=0.2).column("status").to_pylist()[:2] == ["image_error"] * 2


def test_each_actor_decodes_only_the_images_it_needs_once(tiny_itm, tiny_caption, monkeypatch):
    score, captioner = _stages(tiny_itm, tiny_caption, "gpu")
    captioner.policy = "flagged"
    seen = []
    for stage, name in ((score, "score"), (captioner, "caption")):
        decode = stage.jpegs.decode
        monkeypatch.setattr(stage.jpegs, "decode", lambda blobs, o, _d=decode, _n=name: seen.append((_n, len(blobs))) or _d(blobs, o))
    flagged = flag_batch(score(_decode("gpu", tiny_itm, tiny_caption)), itm_threshold=1.0, itc_threshold=None)
    wanted = sum(1 for f, j in zip(flagged.column("flagged").to_pylist(), flagged.column(S.JPEG_CAPTION).to_pylist()) if f and j)
    flagged = flagged.set_column(flagged.schema.get_field_index("flagged"), "flagged", pa.array([True, False] + [True] * (len(ROWS) - 2)))
    out = captioner(flagged)
    assert seen == [("score", 3), ("caption", 2)] and wanted == 3  # the unflagged second JPEG is not decoded
    assert out.column("caption").to_pylist()[1] is None and out.column("caption").to_pylist()[0] is not None


def test_the_keyed_plan_keeps_only_the_bytes_each_stage_computes():
    batch = pa.table({
        P.DO_SCORE: [True, False], P.DO_CAPTION: [False, True],
        S.JPEG_SCORE: pa.array([b"a", b"b"]), S.JPEG_CAPTION: pa.array([b"a", b"b"]),
    })
    out = P.only_needed_pixels(batch)
    assert out.column(S.JPEG_SCORE).to_pylist() == [b"a", None] and out.column(S.JPEG_CAPTION).to_pylist() == [None, b"b"]


def test_cpu_decoding_builds_no_device_decoder(tiny_itm):
    assert ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text").jpegs is None
    with pytest.raises(ValueError, match="JPEG backend"):
        stages._device_decoder("gpu", ScoreStage(model=tiny_itm, device="cpu", max_text_tokens=35, text_column="text").scorer, "nope")


def test_decode_tasks_still_never_import_torch_with_gpu_decoding(tiny_itm, tiny_caption):
    """The header sniff is Pillow only: a decode worker stays as light as with CPU decoding."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
import pyarrow as pa
from benchmarks.samples import photo
from pipelines.dataflow.stages import decode_batch
from pipelines import schema as S
out = decode_batch(pa.table({{"text": ["a photo"], "image": [photo(64, 48, 0)]}}), text_column="text", image_column="image",
                   from_uri=False, score_model={tiny_itm!r}, caption_model={tiny_caption!r}, decode_device="gpu")
assert out.column(S.JPEG_SCORE).is_valid().to_pylist() == [True]
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
