"""The run report's history: flag rate, rows and errors by kind per run, read from the run-summary
tables, drawn as small inline SVG charts (no script, nothing loaded), so that a broken feed (rows
falling to zero, errors jumping) or a drifting flag rate shows at a glance.

Where the history is: an output's own ``_runs/`` (one point per run, in commit order); for a
partition of a nightly output (``OUTPUT/dt=D/``, a Parquet partition or a Delta table's), every
sibling partition's ``_runs/`` too, one point per day: the day's latest run, in date order, so a
rescored day replaces its point instead of adding one out of order. Reading is bounded by what is
drawn (the last ``MAX_POINTS``): one listing, then the newest ``2 * MAX_POINTS`` run files by write
time; for a nightly output one listing per partition and its run files, for the last
``MAX_POINTS`` days only.

Older run-summary files lack later columns: the history is read with its own small schema, and
missing values read as null. A history that cannot be read is a note on the page, never a failed
report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ..storage import Location
from . import views

RUNS_DIR = "_runs"
MAX_POINTS = 60
SHOWN_RUNS = 8

HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("committed_at", pa.timestamp("us", tz="UTC")),
    ("rows", pa.int64()),
    ("flagged", pa.int64()),
    ("rows_image_error", pa.int64()),
    ("rows_text_error", pa.int64()),
])


@dataclass(frozen=True)
class Point:
    run_id: str | None
    committed_at: datetime | None
    partition: str | None  # "2026-11-25" for a nightly partition's run, None otherwise
    rows: int
    flagged: int
    image_errors: int
    text_errors: int

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.rows if self.rows else 0.0

    @property
    def label(self) -> str:
        if self.partition:
            return self.partition
        return self.committed_at.strftime("%Y-%m-%d %H:%M") if self.committed_at else str(self.run_id)


@dataclass
class History:
    points: list[Point] = field(default_factory=list)
    nightly: bool = False
    problem: str | None = None
    runs_read: int = 0


def _partition_name(path: str) -> tuple[str, str] | None:
    """``(parent, "dt=2026-11-25")`` for a partition directory ``parent/dt=2026-11-25``."""
    parent, _, name = path.rstrip("/").rpartition("/")
    key, sep, value = name.partition("=")
    return (parent, name) if sep and key and value and parent else None


def _run_files(fs: pafs.FileSystem, directory: str, newest: int | None = None) -> list[str]:
    """The run-summary files under ``directory/_runs``; with ``newest``, only that many of the most
    recently written (by the listing's times, so a long history is not read whole)."""
    selector = pafs.FileSelector(f"{directory}/{RUNS_DIR}", allow_not_found=True, recursive=False)
    found = [i for i in fs.get_file_info(selector)
             if i.type == pafs.FileType.File and i.base_name.startswith("run-") and i.base_name.endswith(".parquet")]
    if newest is not None and len(found) > newest:
        found = sorted(found, key=lambda i: (i.mtime_ns or 0, i.path))[-newest:]
    return sorted(i.path for i in found)


def _read(fs: pafs.FileSystem, files: list[str]) -> list[dict]:
    if not files:
        return []
    table = pads.dataset(files, filesystem=fs, format="parquet", schema=HISTORY_SCHEMA).to_table()
    return table.to_pylist()


def _point(row: dict, partition: str | None) -> Point:
    return Point(row["run_id"], row["committed_at"], partition, int(row["rows"] or 0), int(row["flagged"] or 0),
                 int(row["rows_image_error"] or 0), int(row["rows_text_error"] or 0))


def read_history(location: Location, max_points: int = MAX_POINTS) -> History:
    """The run history beside ``location`` (see the module docstring); never raises for a bad history."""
    fs = location.filesystem
    try:
        partition = _partition_name(location.path)
        if partition is not None:
            parent, _ = partition
            selector = pafs.FileSelector(parent, allow_not_found=True, recursive=False)
            days = sorted(i.base_name for i in fs.get_file_info(selector)
                          if i.type == pafs.FileType.Directory and _partition_name(i.path) is not None)
            days = days[-max_points:]  # only the days that can be drawn are read
            points, runs = [], 0
            for name in days:
                rows = _read(fs, _run_files(fs, f"{parent}/{name}"))
                runs += len(rows)
                if rows:  # the day's latest run is the one its data holds
                    latest = max(rows, key=lambda r: (r["committed_at"] is not None, r["committed_at"] or 0))
                    points.append(_point(latest, name.partition("=")[2]))
            return History(points[-max_points:], nightly=True, runs_read=runs)
        # Twice the points drawn, by write time, then ordered by commit time (a copied history's
        # times can differ from its commit order a little).
        rows = _read(fs, _run_files(fs, location.path, newest=2 * max_points))
        rows.sort(key=lambda r: (r["committed_at"] is None, r["committed_at"] or 0, r["run_id"] or ""))
        return History([_point(r, None) for r in rows][-max_points:], runs_read=len(rows))
    except (OSError, ValueError, pa.ArrowException) as exc:
        return History(problem=f"the run-summary table could not be read: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# rendering

CSS = """
.history { display: flex; flex-wrap: wrap; gap: 18px; } .history figure { margin: 0; }
.history figcaption { color: #555; font-size: 12px; } .history .line { fill: none; stroke: #c62828; stroke-width: 1.5; }
.history .dot { fill: #c62828; } .history .dot.empty { fill: #fff; stroke: #c62828; } .history .rows { fill: #5b8def; } .history .image-error { fill: #ef6c00; }
.history .text-error { fill: #8e24aa; } .history .now { stroke: #333; stroke-width: 1; stroke-dasharray: 2 2; }
.legend { display: inline-block; width: 9px; height: 9px; margin: 0 3px 0 8px; }
"""

_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 300, 110, 40, 8, 8, 24
# Axis labels in 11 px sans-serif, set on the drawing itself (not left to the page's CSS), so the
# left margin is known to hold the widest label an axis draws: four glyphs ("100%", "500k"), about
# 28 px. The rate axis once ended at 110% of the peak: at a 100% flag rate its label read
# "110.0%", wider than the margin, and a reader saw "10.0%".
_FONT_PX = 11
# Where a flag-rate axis ends: the first of these at or above the highest rate, never above 100%.
RATE_TOPS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.80, 1.0)


def rate_axis_top(highest: float) -> float:
    """The round value a flag-rate axis ends at (``RATE_TOPS``)."""
    return next((top for top in RATE_TOPS if highest <= top), 1.0)


def rate_label(rate: float) -> str:
    return f"{100 * rate:g}%"


def count_axis_top(highest: int) -> int:
    """1, 2 or 5 times a power of ten, at or above ``highest`` (at least 1)."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if top * step >= highest:
                return top * step
        top *= 10


def count_label(count: int) -> str:
    """A round count in at most four glyphs: 500, 2k, 50k, 1M."""
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if count >= size:
            return f"{count / size:g}{suffix}"
    return str(count)


def _frame(title: str, peak: str, first: str, last: str, body: list[str]) -> str:
    plot_h = _H - _TOP - _BOTTOM
    return "".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" aria-label="{views.esc(title)}" '
        f'font-family="sans-serif" font-size="{_FONT_PX}">',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_W - _RIGHT}" y2="{_TOP + plot_h}"/>',
        f'<text x="{_LEFT - 4}" y="{_TOP + 8}" text-anchor="end">{views.esc(peak)}</text>',
        f'<text x="{_LEFT - 4}" y="{_TOP + plot_h}" text-anchor="end">0</text>',
        *body,
        f'<text x="{_LEFT}" y="{_H - 8}" text-anchor="start">{views.esc(first)}</text>',
        f'<text x="{_W - _RIGHT}" y="{_H - 8}" text-anchor="end">{views.esc(last)}</text>' if last != first else "",
        "</svg>",
    ])


def _slots(n: int) -> tuple[float, float]:
    """Slot width and bar width for ``n`` points across the plot."""
    slot = (_W - _LEFT - _RIGHT) / max(1, n)
    return slot, max(1.0, min(24.0, slot * 0.7))


def _bars_svg(points: list[Point], title: str, series: list[tuple[str, str, list[int]]]) -> str:
    """Stacked bars per point; ``series``: (name, css class, values)."""
    plot_h = _H - _TOP - _BOTTOM
    totals = [sum(values[i] for _, _, values in series) for i in range(len(points))]
    peak = count_axis_top(max(totals, default=0))
    slot, bar = _slots(len(points))
    body = []
    for i, point in enumerate(points):
        x = _LEFT + i * slot + (slot - bar) / 2
        bottom = _TOP + plot_h
        for name, css, values in series:
            h = plot_h * values[i] / peak
            if values[i]:
                body.append(f'<rect class="{css}" x="{x:.1f}" y="{bottom - h:.1f}" width="{bar:.1f}" height="{h:.1f}">'
                            f'<title>{views.esc(point.label)} ({views.esc(point.run_id)}): {values[i]} {views.esc(name)}</title></rect>')
            bottom -= h
    return _frame(title, count_label(peak), points[0].label, points[-1].label, body)


def _rate_svg(points: list[Point], title: str) -> str:
    plot_h = _H - _TOP - _BOTTOM
    peak = rate_axis_top(max((p.flag_rate for p in points), default=0.0))
    slot, _ = _slots(len(points))
    xy = [(_LEFT + (i + 0.5) * slot, _TOP + plot_h - plot_h * p.flag_rate / peak) for i, p in enumerate(points)]
    body = [f'<polyline class="line" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}"/>'] if len(xy) > 1 else []
    for (x, y), point in zip(xy, points):
        # A run of zero rows has no flag rate: a hollow dot on the axis, so it reads as "nothing came", not "0%".
        css, what = ("dot empty", "no rows") if not point.rows else ("dot", f"flag rate {100 * point.flag_rate:.1f}% of {point.rows} rows")
        body.append(f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="2.5"><title>{views.esc(point.label)} '
                    f'({views.esc(point.run_id)}): {what}</title></circle>')
    return _frame(title, rate_label(peak), points[0].label, points[-1].label, body)


def _runs_table(points: list[Point], nightly: bool) -> str:
    head = (f"<tr><th>{'day' if nightly else 'committed'}</th><th>run</th><th>rows</th><th>flagged</th><th>flag rate</th>"
            "<th>image errors</th><th>text errors</th></tr>")
    body = "".join(
        f'<tr class="history-run"><td>{views.esc(p.label)}</td><td><code>{views.esc(p.run_id)}</code></td>'
        f'<td class="num">{p.rows}</td><td class="num">{p.flagged}</td><td class="num">{100 * p.flag_rate:.1f}%</td>'
        f'<td class="num">{p.image_errors}</td><td class="num">{p.text_errors}</td></tr>'
        for p in reversed(points[-SHOWN_RUNS:])
    )
    return f'<table class="totals">{head}{body}</table>'


def render_history(history: History) -> str:
    """The history section's body: a note, or three charts and the latest runs as a table."""
    if history.problem:
        return f'<p class="note" id="history-note">{views.esc(history.problem)}</p>'
    points = history.points
    if not points:
        return ('<p class="note" id="history-note">No run history yet: no run-summary table '
                f"(<code>{RUNS_DIR}/run-*.parquet</code>) beside this output.</p>")
    unit = "day" if history.nightly else "run"
    plural = "s" if len(points) != 1 else ""
    each = " (each day's latest run)" if history.nightly else ""
    note = f'<p class="meta" id="history-note">{len(points)} {unit}{plural}{each}, oldest first'
    if len(points) == 1:
        note += "; the first one, so there is nothing to compare with yet"
    note += ".</p>"
    legend = ('<span class="legend image-error" style="background:#ef6c00"></span>image errors'
              '<span class="legend text-error" style="background:#8e24aa"></span>text errors')
    charts = [
        (_rate_svg(points, "flag rate per " + unit), "flag rate"),
        (_bars_svg(points, "rows per " + unit, [("rows", "rows", [p.rows for p in points])]), "rows"),
        (_bars_svg(points, "errors by kind per " + unit, [("image errors", "image-error", [p.image_errors for p in points]),
                                                          ("text errors", "text-error", [p.text_errors for p in points])]),
         "errors by kind" + legend),
    ]
    figures = "".join(f'<figure class="chart">{svg}<figcaption>{caption}</figcaption></figure>' for svg, caption in charts)
    return f'{note}<div class="history" id="history">{figures}</div>{_runs_table(points, history.nightly)}'
