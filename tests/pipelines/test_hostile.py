"""A catalog of hostile records through the real pipeline: one output row per input row, each
with the status its defect calls for, and never a crash.

Pixel-level behaviour (compositing on white, 16-bit scaling, EXIF rotation, first frames) is
proved per operator in tests/blip_ops/test_images.py; here every case goes through Ray Data,
several Parquet files and both model stages, and is identified by a unique ``case`` column.
"""

import io
import json
import random
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import build_config
from pipelines.run import run_job
from tests.conftest import image_bytes, write_catalog

ROOT = Path(__file__).resolve().parents[2]
SHORT_TEXT = "a red circle"
LONG_TEXT = "a red circle on a white background with stripes and dots " * 20
MAX_TEXT_TOKENS = 60  # the tiny tokenizer spells unknown words letter by letter


def _noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (6, 6), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def _png_16bit_rgb(width: int = 4, height: int = 3) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + struct.pack(">HHH", 0xFFFF, 0x8000, 0x0000) * width
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees
    # Every pixel its own colour, so a wrong rotation or a mirror changes the pixels, not just the shape.
    y, x = np.mgrid[0:32, 0:64]
    pixels = np.stack([x * 4, y * 8, (x + 3 * y) % 7 * 30], axis=-1).astype(np.uint8)
    return image_bytes(Image.fromarray(pixels), "JPEG", exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (5, 5), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    return image_bytes(image, transparency=0)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """30000 x 30000 one-bit PNG: a few hundred KB that would decode to 900 megapixels."""
    data = image_bytes(Image.new("1", (30000, 30000)), "PNG")
    assert len(data) < 1_000_000
    return data


def _cases(bomb: bytes) -> list[tuple[str, object, object, str]]:
    """(case, text, image bytes, expected status)."""
    truncated = image_bytes(_noise("RGB", (64, 64)), "JPEG")
    return [
        # Images that must be rejected as image_error.
        ("truncated_jpeg", SHORT_TEXT, truncated[: len(truncated) // 2], "image_error"),
        ("random_bytes", SHORT_TEXT, random.Random(0).randbytes(700), "image_error"),
        ("empty_bytes", SHORT_TEXT, b"", "image_error"),
        ("null_image", SHORT_TEXT, None, "image_error"),
        ("svg", SHORT_TEXT, b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image_error"),
        ("ico_not_allowed", SHORT_TEXT, image_bytes(Image.new("RGB", (16, 16)), "ICO"), "image_error"),
        ("png_header_only", SHORT_TEXT, b"\x89PNG\r\n\x1a\n", "image_error"),
        ("decompression_bomb", SHORT_TEXT, bomb, "image_error"),
        ("bad_image_and_bad_text", "   ", b"junk", "image_error"),  # the image problem wins
        # Images that must be scored.
        ("rgba", SHORT_TEXT, image_bytes(Image.new("RGBA", (6, 5), (255, 0, 0, 0))), "ok"),
        ("palette_transparency", SHORT_TEXT, _palette_with_transparency(), "ok"),
        ("grayscale", SHORT_TEXT, image_bytes(Image.new("L", (6, 5), 90)), "ok"),
        ("cmyk_jpeg", SHORT_TEXT, image_bytes(_noise("CMYK", (6, 5)), "JPEG"), "ok"),
        ("png_16bit_gray", SHORT_TEXT, image_bytes(Image.fromarray(np.full((5, 6), 40000, np.uint16))), "ok"),
        ("png_16bit_rgb", SHORT_TEXT, _png_16bit_rgb(), "ok"),
        ("exif_rotated_jpeg", SHORT_TEXT, _exif_rotated(), "ok"),
        ("animated_gif", SHORT_TEXT, _animated("GIF"), "ok"),
        ("animated_webp", SHORT_TEXT, _animated("WEBP"), "ok"),
        ("bmp", SHORT_TEXT, image_bytes(_noise("RGB", (6, 5)), "BMP"), "ok"),
        ("tiff", SHORT_TEXT, image_bytes(_noise("RGB", (6, 5)), "TIFF"), "ok"),
        ("webp", SHORT_TEXT, image_bytes(_noise("RGB", (6, 5)), "WEBP"), "ok"),
        ("one_by_one", SHORT_TEXT, image_bytes(Image.new("RGB", (1, 1), (9, 9, 9))), "ok"),
        ("elongated_wide", SHORT_TEXT, image_bytes(Image.new("RGB", (3000, 1), (200, 10, 10))), "ok"),
        ("elongated_tall", SHORT_TEXT, image_bytes(Image.new("RGB", (2, 3000), (10, 200, 10))), "ok"),
        # Texts.
        ("null_text", None, image_bytes(Image.new("RGB", (4, 4))), "text_error"),
        ("empty_text", "", image_bytes(Image.new("RGB", (4, 4))), "text_error"),
        ("whitespace_text", " \t\n  ", image_bytes(Image.new("RGB", (4, 4))), "text_error"),
        ("long_text", LONG_TEXT, image_bytes(Image.new("RGB", (4, 4))), "ok"),
        ("unicode_text", "Laufschuhe für Damen – Größe 38, rosé", image_bytes(Image.new("RGB", (4, 4))), "ok"),
        ("emoji_text", "👟 running shoes 🔥🔥", image_bytes(Image.new("RGB", (4, 4))), "ok"),
        ("rtl_text", "حذاء رياضي أحمر · נעל ריצה", image_bytes(Image.new("RGB", (4, 4))), "ok"),
        ("markup_text", "<b>red</b> <script>alert(1)</script> &amp; {{x}} ${y}", image_bytes(Image.new("RGB", (4, 4))), "ok"),
        ("cjk_text", "赤い丸 红色圆圈", image_bytes(Image.new("RGB", (4, 4))), "ok"),
    ]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, bomb):
    records = [
        {"id": f"id-{i % 5}", "case": case, "text": text, "image": image, "expected": status}
        for i, (case, text, image, status) in enumerate(_cases(bomb))
    ]
    directory = write_catalog(tmp_path_factory.mktemp("hostile"), records, files=4)
    # A file whose text and image columns hold only nulls is written with Arrow's null type.
    odd = {"id": "id-x", "case": "null_typed_file", "text": None, "image": None, "expected": "image_error"}
    pq.write_table(pa.table({k: pa.nulls(1) if v is None else [v] for k, v in odd.items()}), directory / "part-9.parquet")
    return records + [odd], directory


@pytest.fixture(scope="module")
def hostile_run(ray_session, tiny_itm, tiny_caption, catalog, tmp_path_factory):
    records, directory = catalog
    output = tmp_path_factory.mktemp("hostile-out")
    summary = run_job(build_config(dict(
        input=str(directory), output=str(output), itm_model=tiny_itm, caption_model=tiny_caption, device="cpu",
        max_text_tokens=MAX_TEXT_TOKENS, max_new_tokens=3, decode_batch_size=4, score_batch_size=8, caption_batch_size=8,
    )))
    return summary, {row["case"]: row for row in pq.read_table(output).to_pylist()}, output


def test_one_output_row_per_input_row(hostile_run, catalog):
    records, directory = catalog
    summary, by_case, output = hostile_run
    assert len(list(directory.glob("*.parquet"))) == 5
    rows = pq.read_table(output).to_pylist()
    assert Counter(r["case"] for r in rows) == Counter(r["case"] for r in records)
    assert len(rows) == len(records) == summary.rows_read == summary.rows_written


def test_each_case_gets_its_status(hostile_run, catalog):
    records, _ = catalog
    _, by_case, _ = hostile_run
    wrong = {r["case"]: (by_case[r["case"]]["status"], by_case[r["case"]]["error"])
             for r in records if by_case[r["case"]]["status"] != r["expected"]}
    assert not wrong
    for record in records:
        row = by_case[record["case"]]
        if record["expected"] == "ok":
            assert row["error"] is None and row["itc_score"] is not None and row["itm_score"] is not None
            assert row["caption"] is not None
        else:
            assert row["error"] and row["flagged"] and record["expected"] in row["flag_reasons"]
            assert row["itc_score"] is None and row["itm_score"] is None


def test_errors_name_the_problem(hostile_run):
    _, by_case, _ = hostile_run
    expected = {
        "truncated_jpeg": "truncated", "random_bytes": "unrecognised", "empty_bytes": "empty image bytes",
        "null_image": "missing image", "svg": "unrecognised", "ico_not_allowed": "unsupported",
        "decompression_bomb": "too large", "null_text": "missing text", "empty_text": "blank text",
        "whitespace_text": "blank text",
    }
    for case, fragment in expected.items():
        assert fragment in by_case[case]["error"], (case, by_case[case]["error"])
    assert "blank text" in by_case["bad_image_and_bad_text"]["error"]  # both problems are reported


def test_texts_are_plain_text_and_long_ones_truncated(hostile_run, catalog):
    records, _ = catalog
    _, by_case, _ = hostile_run
    for record in records:
        row = by_case[record["case"]]
        assert row["text"] == record["text"]  # passed through byte for byte
        assert row["text_truncated"] == (record["case"] == "long_text"), record["case"]


def test_decompression_bomb_is_refused_in_bounded_memory(bomb, tmp_path):
    # In a fresh process, so the peak resident size measures only this decode.
    (tmp_path / "bomb.png").write_bytes(bomb)
    script = (
        "import resource, sys\n"
        "from blip_ops.images import ImageError, decode_rgb\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_rgb(data)\n"
        "    print('decoded')\n"
        "except ImageError as exc:\n"
        "    print('refused', exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bomb.png")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    verdict, grown_mb = result.stdout.strip().splitlines()[-2:]
    assert verdict.startswith("refused") and "too large" in verdict
    assert int(grown_mb) < 32  # the 900-megapixel bitmap (113 MB as bits, 2.7 GB as RGB) never exists


def test_manifest_counts_every_status(hostile_run, catalog):
    records, _ = catalog
    _, _, output = hostile_run
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["rows_by_status"] == dict(Counter(r["expected"] for r in records))
