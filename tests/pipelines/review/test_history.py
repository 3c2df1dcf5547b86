"""The report's history section, read from run-summary tables (plain outputs and nightly partitions), without Ray."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pipelines.review import artifacts, history
from pipelines.storage import locate

HOSTILE = '<img src=x onerror=alert(1)>'
T0 = datetime(2026, 11, 1, 2, 30, tzinfo=timezone.utc)


def _run(directory, run_id, day, rows, flagged, image_errors=0, text_errors=0):
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.write_run_summary(locate(str(directory)), {
        "run_id": run_id, "committed_at": T0 + timedelta(days=day), "rows": rows, "flagged": flagged,
        "rows_image_error": image_errors, "rows_text_error": text_errors,
    })


def test_runs_in_commit_order_with_a_zero_row_run_and_hostile_run_ids(tmp_path):
    _run(tmp_path, "r2", 2, 120, 30, image_errors=9)
    _run(tmp_path, "r0", 0, 100, 10, image_errors=2, text_errors=1)
    _run(tmp_path, HOSTILE, 1, 0, 0)  # the feed broke: nothing came
    found = history.read_history(locate(str(tmp_path)))
    assert [p.run_id for p in found.points] == ["r0", HOSTILE, "r2"] and not found.nightly
    assert [p.flag_rate for p in found.points] == [0.1, 0.0, 0.25]
    page = history.render_history(found)
    assert page.count("<circle") == 3 and page.count('class="dot empty"') == 1 and "<polyline" in page
    assert page.count('class="image-error"') == 2 and page.count('class="text-error"') == 1
    assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count('<tr class="history-run">') == 3 and "3 runs, oldest first" in page


def test_one_run_and_no_history(tmp_path):
    assert "No run history yet" in history.render_history(history.read_history(locate(str(tmp_path))))
    _run(tmp_path, "only", 0, 5, 1)
    one = history.read_history(locate(str(tmp_path)))
    page = history.render_history(one)
    assert len(one.points) == 1 and "nothing to compare with yet" in page
    assert page.count("<circle") == 1 and "<polyline" not in page  # one point: no line to draw


def test_a_nightly_partition_reads_every_day_latest_run_per_day(tmp_path):
    """Parquet nightly (OUTPUT/dt=D/_runs) and a Delta table's partitions (TABLE/dt=D/_runs) lie alike."""
    _run(tmp_path / "dt=2026-11-02", "d2", 1, 50, 5)
    _run(tmp_path / "dt=2026-11-01", "d1", 0, 40, 4)
    _run(tmp_path / "dt=2026-11-01", "d1-rescored", 3, 40, 8)  # rescored later: the day's point
    (tmp_path / "dt=2026-11-03").mkdir()  # a day without a committed run: no point
    (tmp_path / "_nightly").mkdir()
    found = history.read_history(locate(str(tmp_path / "dt=2026-11-02")))
    assert found.nightly and found.runs_read == 3
    assert [(p.label, p.run_id) for p in found.points] == [("2026-11-01", "d1-rescored"), ("2026-11-02", "d2")]
    assert "2 days (each day's latest run)" in history.render_history(found)
    last = history.read_history(locate(str(tmp_path / "dt=2026-11-02")), max_points=1)
    assert [p.run_id for p in last.points] == [] and last.runs_read == 0  # only the newest day (no run) is read


def test_an_unreadable_history_is_a_note_not_a_failure(tmp_path):
    (tmp_path / history.RUNS_DIR).mkdir()
    (tmp_path / history.RUNS_DIR / "run-broken.parquet").write_bytes(b"not parquet")
    found = history.read_history(locate(str(tmp_path)))
    assert found.points == [] and "could not be read" in found.problem
    assert 'class="note"' in history.render_history(found)


def test_only_the_last_points_are_drawn(tmp_path):
    for day in range(5):
        _run(tmp_path, f"r{day}", day, 10, day)
    found = history.read_history(locate(str(tmp_path)), max_points=3)
    assert [p.run_id for p in found.points] == ["r2", "r3", "r4"] and found.runs_read == 5
    # A long history is not read whole: twice the points drawn, the newest files by write time.
    found = history.read_history(locate(str(tmp_path)), max_points=2)
    assert [p.run_id for p in found.points] == ["r3", "r4"] and found.runs_read == 4


@pytest.mark.parametrize("rows", [0, 7])
def test_point_flag_rate_is_defined_for_zero_rows(rows):
    point = history.Point("r", T0, None, rows, min(rows, 3), 0, 0)
    assert point.flag_rate == (3 / 7 if rows else 0.0)


# Advance widths (em) of Helvetica/Arial, the widest common sans-serif for these glyphs; any other
# glyph counts as a full em, so the estimate errs wide. A label fits when its estimated extent lies
# inside the drawing.
_EM = {**dict.fromkeys("0123456789", 0.556), "%": 0.889, ".": 0.278, "-": 0.333, ":": 0.278, " ": 0.278,
       "k": 0.5, "M": 0.833, "G": 0.778}


def _drawn_labels(page: str) -> list[list[dict]]:
    """Each chart's text elements as drawn: text, x, anchor, and their estimated left and right edges."""
    import re
    import xml.etree.ElementTree as ET

    charts = []
    for svg_text in re.findall(r"<svg .*?</svg>", page):
        svg = ET.fromstring(svg_text)
        size = float(svg.get("font-size"))
        labels = []
        for text in svg.iter("{http://www.w3.org/2000/svg}text"):
            content = "".join(text.itertext())
            width = size * sum(_EM.get(ch, 1.0) for ch in content)
            x, anchor = float(text.get("x")), text.get("text-anchor", "start")
            left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
            labels.append({"text": content, "x": x, "anchor": anchor, "left": left, "right": left + width,
                           "svg_width": float(svg.get("width"))})
        charts.append(labels)
    return charts


def test_a_full_flag_rate_axis_ends_at_100_percent_and_its_label_is_drawn_whole(tmp_path):
    """Three nights at 90-100%: the axis ends at 100% (not 110%), and the label fits left of the axis."""
    for day, flagged in enumerate((90, 95, 100)):
        _run(tmp_path, f"n{day}", day, 100, flagged)
    page = history.render_history(history.read_history(locate(str(tmp_path))))
    rate, rows, errors = _drawn_labels(page)
    assert [label["text"] for label in rate][:2] == ["100%", "0"]
    assert [label["text"] for label in rows][:2] == ["100", "0"] and [label["text"] for label in errors][:2] == ["1", "0"]
    for label in rate + rows + errors:
        assert label["left"] >= 0 and label["right"] <= label["svg_width"], label  # nothing clipped
    for label in (rate + rows + errors):
        if label["text"] in ("100%", "100", "1", "0"):  # the axis labels: right-aligned before the plot's left edge
            assert label["anchor"] == "end" and label["x"] < 40
    # The 100% night is drawn on the axis's top, inside the plot.
    assert 'cy="8.0"' in page


@pytest.mark.parametrize("highest, top, label", [
    (0.0, 0.01, "1%"), (0.004, 0.01, "1%"), (0.01, 0.01, "1%"), (0.013, 0.02, "2%"), (0.07, 0.10, "10%"),
    (0.25, 0.30, "30%"), (0.5, 0.5, "50%"), (0.61, 0.80, "80%"), (0.9, 1.0, "100%"), (1.0, 1.0, "100%"),
])
def test_a_rate_axis_ends_at_a_round_value_no_higher_than_100_percent(highest, top, label):
    assert history.rate_axis_top(highest) == pytest.approx(top) and history.rate_label(history.rate_axis_top(highest)) == label


@pytest.mark.parametrize("highest, top, label", [
    (0, 1, "1"), (1, 1, "1"), (3, 5, "5"), (120, 200, "200"), (1000, 1000, "1k"), (1001, 2000, "2k"),
    (45_000, 50_000, "50k"), (480_000, 500_000, "500k"), (1_200_000, 2_000_000, "2M"), (7 * 10**9, 10**10, "10G"),
])
def test_a_count_axis_ends_at_a_round_value_with_a_short_label(highest, top, label):
    assert history.count_axis_top(highest) == top and history.count_label(top) == label


def test_every_axis_label_fits_the_margin_whatever_the_counts(tmp_path):
    _run(tmp_path, "big", 0, 7_654_321, 7_654_321, image_errors=987_654, text_errors=12_345)
    _run(tmp_path, "small", 1, 3, 0)
    page = history.render_history(history.read_history(locate(str(tmp_path))))
    charts = _drawn_labels(page)
    assert [chart[0]["text"] for chart in charts] == ["100%", "10M", "1M"]
    for label in [label for chart in charts for label in chart]:
        assert label["left"] >= 0 and label["right"] <= label["svg_width"], label
