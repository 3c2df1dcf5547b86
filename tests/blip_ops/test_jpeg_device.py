"""JPEG decoding on the model's device (--decode-device gpu), run on the CPU: which rows may take it,
EXIF orientation, the resize's closeness to Pillow's, and the per-row fallback to the CPU path."""

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from benchmarks.samples import photo
from blip_ops import jpeg_device
from blip_ops.images import ImageError, decode_rgb
from blip_ops.jpeg_device import DeviceJpegDecoder, orient, sniff_jpeg
from blip_ops.preprocess import Resize

RESIZE = Resize(384, 384, 3)  # BLIP ITM's input, Pillow bicubic


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _oriented(orientation: int, width=48, height=32) -> bytes:
    image = Image.open(io.BytesIO(photo(width, height, seed=orientation)))
    exif = image.getexif()
    exif[0x0112] = orientation
    return _jpeg(image, exif=exif.tobytes(), quality=95)


def test_sniff_passes_plain_jpegs_and_sends_everything_else_to_the_cpu_path(monkeypatch):
    rgb = photo(64, 48, seed=0)
    assert sniff_jpeg(rgb) == 1
    assert sniff_jpeg(_jpeg(Image.new("L", (20, 10), 9))) == 1
    assert sniff_jpeg(_jpeg(Image.new("RGB", (20, 10), 9), progressive=True)) == 1
    png = io.BytesIO()
    Image.new("RGB", (20, 10)).save(png, "PNG")
    refused = {
        "png": png.getvalue(),
        "cmyk": _jpeg(Image.new("CMYK", (20, 10), (1, 2, 3, 4))),
        "truncated": rgb[: len(rgb) // 2],
        "junk": b"\xff\xd8junk",
        "empty": b"",
        "none": None,
    }
    assert {name: sniff_jpeg(data) for name, data in refused.items()} == dict.fromkeys(refused)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a decompression bomb is the CPU path's error to give
    assert sniff_jpeg(rgb) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_pixels_as_pillow_exif_transpose_does(orientation):
    blob = _oriented(orientation)
    assert sniff_jpeg(blob) == orientation
    raw = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))  # as stored, as nvJPEG returns it
    turned = orient(torch.from_numpy(raw.transpose(2, 0, 1).copy()), orientation).numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(turned, decode_rgb(blob))


def test_device_decode_and_resize_stay_close_to_the_pillow_path():
    blobs = [photo(480, 360, seed) for seed in range(4)] + [_oriented(6, 480, 360)]
    decoded = DeviceJpegDecoder(RESIZE, "cpu", backend="pil").decode(blobs, [1, 1, 1, 1, 6])
    assert decoded.errors == [None] * 5 and decoded.on_device == 5 and decoded.fell_back == 0
    assert decoded.pixels.dtype == torch.uint8 and tuple(decoded.pixels.shape) == (5, 3, 384, 384)
    reference = np.stack([RESIZE.resize(decode_rgb(b)) for b in blobs]).astype(int)
    difference = np.abs(decoded.pixels.numpy().astype(int) - reference)
    # torch's antialiased bicubic follows Pillow's filter but not its integer arithmetic.
    assert difference.mean() < 0.5 and difference.max() <= 16
    assert difference.mean() > 0  # not Pillow's own resize


def test_refused_rows_fall_back_to_the_cpu_path_alone_with_its_error_rules():
    good = photo(64, 48, seed=1)
    cmyk = _jpeg(Image.new("CMYK", (64, 48), (10, 200, 30, 0)))  # nvJPEG (and the stand-in) refuse CMYK
    truncated = good[: len(good) // 2]
    decoded = DeviceJpegDecoder(RESIZE, "cpu", backend="pil").decode([good, cmyk, truncated, b"junk"], [1] * 4)
    assert decoded.on_device == 1 and decoded.fell_back == 1
    with pytest.raises(ImageError) as truncated_error:
        decode_rgb(truncated)
    assert decoded.errors == [None, None, str(truncated_error.value), "unrecognised or unsupported image format"]
    np.testing.assert_array_equal(decoded.pixels[1].numpy(), RESIZE.resize(decode_rgb(cmyk)))  # the CPU path, exactly
    assert decoded.pixels[0].float().std() > 0


def test_one_refused_jpeg_does_not_cost_the_batch(monkeypatch):
    calls = []

    def picky(tensors, device):
        calls.append(len(tensors))
        if any(t[-3] == 0x42 for t in tensors):
            raise RuntimeError("nvjpeg refused")
        return jpeg_device._pil_decode(tensors, device)

    monkeypatch.setitem(jpeg_device._DECODERS, "pil", picky)
    blobs = [photo(32, 24, seed) for seed in range(3)]
    marked = blobs[1][:-3] + b"\x42" + blobs[1][-2:]  # the byte before the end marker: pixels unchanged
    decoded = DeviceJpegDecoder(Resize(16, 16, 3), "cpu", backend="pil").decode([blobs[0], marked, blobs[2]], [1] * 3)
    assert calls == [3, 1, 1, 1] and decoded.on_device == 2 and decoded.fell_back == 1 and decoded.errors == [None] * 3


def test_an_empty_batch_and_an_unknown_backend():
    assert tuple(DeviceJpegDecoder(RESIZE, "cpu", backend="pil").decode([], []).pixels.shape) == (0, 3, 384, 384)
    with pytest.raises(ValueError, match="torchvision, pil"):
        DeviceJpegDecoder(RESIZE, "cpu", backend="dali")


def test_torchvision_problem_names_the_option_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # import fails, as where it is not installed
    problem = jpeg_device.torchvision_problem()
    assert "--decode-device gpu needs torchvision" in problem and "blip-moderate[gpu]" in problem
    fake = types.ModuleType("torchvision.io")
    fake.decode_jpeg = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)
    assert jpeg_device.torchvision_problem() is None


def test_an_actor_without_torchvision_fails_at_once_instead_of_falling_back_on_every_row(monkeypatch):
    monkeypatch.setattr(jpeg_device, "torchvision_problem", lambda: "--decode-device gpu needs torchvision (test)")
    with pytest.raises(RuntimeError, match="needs torchvision"):
        DeviceJpegDecoder(RESIZE, "cpu", backend="torchvision")
    DeviceJpegDecoder(RESIZE, "cpu", backend="pil")  # the stand-in needs none


def test_torchvision_backend_matches_the_pillow_stand_in():
    """Where torchvision imports (the GPU machine; not the 2-core CI, whose CPU torch it does not load
    beside): its CPU decoder is libjpeg-turbo too, so it gives the stand-in's pixels."""
    if jpeg_device.torchvision_problem():
        pytest.skip("torchvision not importable here")
    blobs = [photo(480, 360, seed) for seed in range(3)] + [_oriented(8, 480, 360)]
    ours = DeviceJpegDecoder(RESIZE, "cpu", backend="torchvision").decode(blobs, [1, 1, 1, 8])
    stand_in = DeviceJpegDecoder(RESIZE, "cpu", backend="pil").decode(blobs, [1, 1, 1, 8])
    assert ours.errors == [None] * 4 and ours.on_device == 4
    assert (ours.pixels.int() - stand_in.pixels.int()).abs().float().mean() < 0.5
    if torch.cuda.is_available():
        gpu = DeviceJpegDecoder(RESIZE, "cuda", backend="torchvision").decode(blobs, [1, 1, 1, 8])
        assert gpu.errors == [None] * 4 and (gpu.pixels.cpu().int() - stand_in.pixels.int()).abs().float().mean() < 2


def test_exif_transpose_reference_is_pillows():
    """The reference the orientation test compares with is Pillow's own exif_transpose."""
    blob = _oriented(6)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB"))
    np.testing.assert_array_equal(decode_rgb(blob), expected)
