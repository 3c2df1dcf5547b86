"""The evidence overlay: heat where the map is hot, the image untouched where it is cold, a legend below."""

import numpy as np
import pytest
from PIL import Image

from blip_ops.evidence import Evidence
from blip_ops.heatmap import _INFERNO, colormap, heat_at, legend, overlay
from tests.conftest import image_bytes


def _evidence(hot=(1, 4), rows=4, cols=6):
    heat = np.zeros((rows, cols), np.float32)
    heat[hot] = 2.5  # raw Grad-CAM values are small and unnormalised
    return {"rows": rows, "cols": cols, "heat": heat.ravel().tolist(), "words": [], "layer": 0}


def _picture(width=240, height=160):
    return Image.new("RGB", (width, height), (120, 140, 160))


def test_heat_lands_on_the_hot_patch_and_leaves_cold_ones_alone():
    picture = _picture()
    drawn = overlay(picture, _evidence(hot=(1, 4)), show_legend=False)
    assert drawn.size == picture.size
    change = np.abs(np.asarray(drawn, np.float32) - np.asarray(picture, np.float32)).sum(axis=2)
    # The patch grid is stretched over the image: patch (row 1, col 4) of 4x6 covers y 40-80, x 160-200.
    y, x = np.unravel_index(change.argmax(), change.shape)
    assert 40 <= y < 80 and 160 <= x < 200
    # Far from the heat the image is untouched (bicubic ringing leaves at most a trace).
    assert change[:, :100].max() == 0 and change[140:, :].max() < 0.05 * change.max()


def test_the_map_is_normalised_upsampled_and_blurred():
    heat = heat_at(_evidence(), 240, 160)
    assert heat.shape == (160, 240) and heat.min() == pytest.approx(0) and heat.max() == pytest.approx(1)
    # Blurred: the hot patch's edge fades instead of stepping from 1 to 0.
    row = heat[60]
    assert 0.05 < row[150] < 0.95


def test_flat_map_leaves_the_image_as_it_is_and_a_legend_is_added():
    picture = _picture()
    flat = dict(_evidence(), heat=[0.0] * 24)
    drawn = overlay(picture, flat)
    assert drawn.size == (240, 160 + legend(240).height)
    assert np.array_equal(np.asarray(drawn)[:160], np.asarray(picture))
    strip = np.asarray(legend(240))
    assert strip.shape[1] == 240 and len({tuple(p) for p in strip[strip.shape[0] // 2]}) > 50  # a gradient


def test_accepts_bytes_arrays_and_evidence_objects_and_shrinks_for_thumbnails():
    picture = _picture(400, 200)
    evidence = _evidence()
    from_bytes = overlay(image_bytes(picture), evidence, max_size=100, show_legend=False)
    assert from_bytes.size == (100, 50)
    as_object = Evidence(4, 6, np.asarray(evidence["heat"], np.float32), 0)
    assert np.array_equal(np.asarray(overlay(np.asarray(picture), as_object)), np.asarray(overlay(picture, evidence)))
    with pytest.raises(ValueError, match="24 values for a 5x5 grid"):
        overlay(picture, dict(evidence, rows=5, cols=5))


def test_colormap_is_inferno_from_dark_to_light():
    ends = colormap(np.array([0.0, 1.0]))
    assert ends.tolist() == [list(np.round(_INFERNO[0] * 255).astype(int)), list(np.round(_INFERNO[-1] * 255).astype(int))]
    lightness = colormap(np.linspace(0, 1, 50)).astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lightness) > 0)  # perceptually ordered: brighter means hotter


def test_the_documented_overlay_example_runs(tmp_path, monkeypatch):
    """docs/signals.md's two lines, on image bytes and on a Pillow image, with a row's evidence."""
    from tests import docs

    code = docs.block("## Evidence maps: why a row was flagged", "python")
    monkeypatch.chdir(tmp_path)
    for image, width in ((image_bytes(_picture(240, 160), "JPEG"), 240), (_picture(300, 200), 300)):
        exec(code, {"image_bytes_or_pil": image, "row": {"evidence": _evidence()}})
        with Image.open(tmp_path / "why.png") as drawn:
            assert drawn.width == width and drawn.height > 160  # the image, with the legend below
        (tmp_path / "why.png").unlink()
