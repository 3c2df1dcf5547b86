import io

import numpy as np
import pytest
from PIL import Image

from blip_ops.images import ImageError, decode_rgb, open_image
from tests.conftest import image_bytes


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgb = decode_rgb(image_bytes(image))
    assert rgb.shape == (4, 4, 3)
    assert (rgb == 255).all()


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    rgb = decode_rgb(image_bytes(image, transparency=0))
    assert (rgb == 255).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    array = np.full((3, 3), 65535 // 2, dtype=np.uint16)
    rgb = decode_rgb(image_bytes(Image.fromarray(array)))
    assert rgb.dtype == np.uint8
    assert abs(int(rgb[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize(
    "values, expected",
    [([-5, 0, 30, 200], [0, 0, 30, 200]), ([-5, 0, 257 * 100, 70000], [0, 0, 100, 255])],
)
def test_thirty_two_bit_pixels_are_clipped_or_scaled_never_wrapped(values, expected):
    data = image_bytes(Image.fromarray(np.array([values], dtype=np.int32)), "TIFF")
    assert decode_rgb(data)[0, :, 0].tolist() == expected


def _asymmetric(width=12, height=6) -> np.ndarray:
    """No rotation or mirror maps this image onto itself: every pixel has its own colour."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 20, y * 40, (x + 3 * y) % 7 * 30], axis=-1).astype(np.uint8)


def _with_orientation(pixels: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(Image.fromarray(pixels), fmt, exif=exif.tobytes())


# What a viewer shows for each EXIF orientation of stored pixels (EXIF 2.32, tag 0x0112),
# written with numpy so that it does not lean on Pillow's own transpose table.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # rotated 90 clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, k=1),  # rotated 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_is_honoured_pixel_for_pixel(orientation):
    pixels = _asymmetric()
    got = decode_rgb(_with_orientation(pixels, orientation, "PNG"))  # lossless: exact pixels
    np.testing.assert_array_equal(got, DISPLAYED[orientation](pixels))


@pytest.mark.parametrize("orientation", [3, 6, 7, 8])
def test_exif_rotated_jpeg_equals_the_reference_decode(orientation):
    from tests.reference import _open

    data = _with_orientation(np.kron(_asymmetric(), np.ones((8, 8, 1), dtype=np.uint8)), orientation, "JPEG")
    expected = np.asarray(_open(data).convert("RGB"))
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = decode_rgb(data)
    assert got.shape != stored.shape or not np.array_equal(got, stored)  # the orientation did something
    np.testing.assert_array_equal(got, expected)


def test_animated_gif_decodes_first_frame():
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    rgb = decode_rgb(buffer.getvalue())
    assert rgb[0, 0, 0] > 200 and rgb[0, 0, 2] < 50


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"])
def test_catalog_formats_decode(fmt):
    rgb = decode_rgb(image_bytes(Image.new("RGB", (5, 3), (10, 20, 30)), fmt))
    assert rgb.shape == (3, 5, 3)


def test_cmyk_and_grayscale_become_rgb():
    assert decode_rgb(image_bytes(Image.new("CMYK", (2, 2)), "JPEG")).shape == (2, 2, 3)
    assert decode_rgb(image_bytes(Image.new("L", (2, 2), 7))).shape == (2, 2, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "missing image"),
        (b"", "empty image bytes"),
        (b"\x00\x01garbage" * 10, "unrecognised"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "unrecognised"),
        (b"\x89PNG\r\n\x1a\n", "unrecognised|corrupt"),
    ],
)
def test_bad_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_rgb(data)


def test_truncated_jpeg_is_an_image_error():
    data = image_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused():
    bomb = image_bytes(Image.new("1", (30000, 30000)), "PNG")
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="too large"):
        decode_rgb(bomb)


@pytest.mark.parametrize(
    "mode, size",
    [("RGB", (5, 4)), ("RGBA", (5, 4)), ("LA", (5, 4)), ("L", (5, 4)), ("1", (5, 4)), ("P", (5, 4)),
     ("P-transparent", (5, 4)), ("PA", (5, 4)), ("CMYK", (5, 4)), ("I;16", (5, 4)), ("YCbCr", (5, 4))],
)
def test_rgb_conversion_equals_transformers(mode, size):
    """decode_rgb restates transformers' convert_to_rgb (so decode workers need not import it); same pixels."""
    from transformers.image_transforms import convert_to_rgb

    from blip_ops.images import _scale_to_8_bit, to_rgb_array

    rng = np.random.RandomState(0)
    if mode == "I;16":
        image = Image.fromarray(rng.randint(0, 65536, size[::-1], dtype=np.uint16))
    elif mode.startswith("P"):
        image = Image.fromarray(rng.randint(0, 256, size[::-1], dtype=np.uint8), "L").convert("P")
        image.putpalette(list(rng.randint(0, 256, 768)))
        if mode == "P-transparent":
            image.info["transparency"] = 3
        elif mode == "PA":
            image = image.convert("PA")
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        image = Image.frombytes(mode, size, rng.randint(0, 256, size[0] * size[1] * bands, dtype=np.uint8).tobytes())
    expected_input = _scale_to_8_bit(image) if mode == "I;16" else image
    np.testing.assert_array_equal(to_rgb_array(image), convert_to_rgb(expected_input, return_numpy=True))


def _photo_jpeg(width, height, **save):
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)
    return image_bytes(Image.fromarray(array), "JPEG", quality=90, **save)


def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_both_sides():
    data = _photo_jpeg(1600, 1200)
    assert decode_rgb(data).shape == (1200, 1600, 3)
    assert decode_rgb(data, draft_size=384).shape == (600, 800, 3)  # 1/4 would leave 300 < 384
    assert decode_rgb(data, draft_size=100).shape == (150, 200, 3)  # 1/8, the smallest libjpeg offers
    assert decode_rgb(data, draft_size=1300).shape == (1200, 1600, 3)  # no scale keeps 1300


def test_jpeg_draft_follows_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _photo_jpeg(1600, 1200, exif=exif.tobytes())
    assert decode_rgb(data).shape == (1600, 1200, 3)
    assert decode_rgb(data, draft_size=384).shape == (800, 600, 3)


def test_jpeg_draft_leaves_other_formats_alone():
    y, x = np.mgrid[0:1200, 0:1600]
    data = image_bytes(Image.fromarray((x % 256).astype(np.uint8)), "PNG")
    np.testing.assert_array_equal(decode_rgb(data, draft_size=384), decode_rgb(data))
