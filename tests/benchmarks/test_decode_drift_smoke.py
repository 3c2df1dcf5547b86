"""benchmarks.decode_drift at its smallest, on the CPU: the figures the README's drift table quotes."""

import json

from benchmarks import decode_drift


def test_drift_reports_pixels_and_scores_of_both_paths(capsys):
    assert decode_drift.main(["--images", "2", "--large", "1", "--skip-mid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for side in ("pixels_384", "pixels_224"):
        assert 0 < result[side]["mean_abs_levels"] < 0.5 and result[side]["max_abs_levels"] <= 16
    tiny = result["scores_tiny"]
    assert tiny["precision"] == "fp32" and tiny["itm_spread"] > 0.01  # scores depend on the image at all
    assert 0 < max(tiny["itc_max_abs"], tiny["itm_max_abs"]) < 0.02
    assert tiny["below_bf16_noise"] == (max(tiny["itc_max_abs"], tiny["itm_max_abs"]) < decode_drift.BF16_NOISE)
