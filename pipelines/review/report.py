"""The run report: one self-contained ``report.html`` describing a committed output. No model code.

``collect_stats`` reads the committed files once, batch by batch (driver memory stays bounded
whatever the output size): counts by status, score histograms, flag rate per category and the
most confident mismatches. ``fetch_images`` reads only those few rows' images back from the
input by id; examples with ``evidence`` also get its heat map drawn over the image
(``blip_ops.heatmap``). ``render_report`` turns it all into HTML with inline CSS and SVG and JPEG
data URIs: nothing is loaded from anywhere, so the file reads offline, attached to a ticket or mail.
The page opens with what an operator checks first: totals, the run history (``history.py``: flag
rate, rows and errors by kind per run, or per day for a nightly partition) and the most frequent
error messages with example ids (``OutputStats.add_errors``, in the same streaming pass).

Why Python strings and ``views.esc``, not Jinja2 templates (considered in issue 16, when the
history and errors sections were added; Jinja2 is installed anyway, as torch's dependency, so the
cost of a dependency did not decide it). Most of the markup on these pages is computed: SVG
coordinates, bar heights, stacked series, data URIs. In a template, each of those would arrive
as a pre-rendered fragment marked ``|safe``, which is exactly the place autoescaping does not
protect, while the short tables around them would move away from the numbers they show into a
second file. The three pages (this report, the calibration page, the notebook views) are a few
hundred lines of markup in small functions, each of which escapes every value it did not compute
itself; what makes that hold is a test per section that feeds it hostile text (catalog markup in
texts, categories and captions; a run id and an error message with markup in the history and
errors sections) and checks, in Chromium too, that it shows as text and nothing runs. Revisit if the
pages gain a shared layout or are edited by people who do not write Python.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..config import JobConfig
from ..schema import SCHEMA_VERSION
from ..storage import Location, locate, read_bytes
from ..labels import LabelSet
from . import label_report, views
from .history import CSS as HISTORY_CSS
from .history import History, read_history, render_history

# Fine histograms: quantiles read from them are within half a bin (0.0005) of the exact value.
ITM_RANGE, ITM_BINS = (0.0, 1.0), 1000
ITC_RANGE, ITC_BINS = (-1.0, 1.0), 2000
DISPLAY_BINS = 30
EXAMPLES = 12
MAX_CATEGORIES = 30
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# The errors section: the most frequent messages, a few example ids each. Distinct messages are
# tracked up to a bound (messages can carry numbers, e.g. an image's size); later new ones are
# counted together, so memory stays bounded whatever the output size.
ERROR_MESSAGES_SHOWN = 10
ERROR_EXAMPLE_IDS = 3
MAX_ERROR_MESSAGES = 1000


@dataclass
class Histogram:
    low: float
    high: float
    counts: np.ndarray

    @classmethod
    def empty(cls, value_range: tuple[float, float], bins: int) -> "Histogram":
        return cls(value_range[0], value_range[1], np.zeros(bins, dtype=np.int64))

    @property
    def width(self) -> float:
        return (self.high - self.low) / len(self.counts)

    def add(self, values: np.ndarray) -> None:
        counts, _ = np.histogram(np.clip(values, self.low, self.high), bins=len(self.counts), range=(self.low, self.high))
        self.counts += counts

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        """The centre of the bin holding the q-quantile; None with no values."""
        if not self.total:
            return None
        index = int(np.searchsorted(np.cumsum(self.counts), q * self.total, side="left"))
        return round(self.low + (min(index, len(self.counts) - 1) + 0.5) * self.width, 4)

    def display(self, threshold: float | None, bins: int = DISPLAY_BINS) -> "Histogram":
        """Regrouped to about ``bins`` bars over the occupied range (and the threshold), on 0.1 steps."""
        occupied = np.flatnonzero(self.counts)
        if len(occupied):
            low = self.low + occupied[0] * self.width
            high = self.low + (occupied[-1] + 1) * self.width
        else:
            low, high = self.low, self.high
        if threshold is not None:
            low, high = min(low, threshold), max(high, threshold)
        low = max(self.low, math.floor(low * 10 + 1e-9) / 10)
        high = min(self.high, math.ceil(high * 10 - 1e-9) / 10)
        if high <= low:
            high = min(self.high, low + 0.1)
        first = int(round((low - self.low) / self.width))
        last = int(round((high - self.low) / self.width))
        group = max(1, math.ceil((last - first) / bins))
        last = min(len(self.counts), first + group * math.ceil((last - first) / group))
        counts = self.counts[first:last]
        counts = np.pad(counts, (0, (-len(counts)) % group)).reshape(-1, group).sum(axis=1)
        return Histogram(self.low + first * self.width, self.low + first * self.width + len(counts) * group * self.width, counts)


@dataclass
class OutputStats:
    rows: int = 0
    flagged: int = 0
    by_status: Counter = field(default_factory=Counter)
    # Flagged rows by reason; a row flagged for two reasons counts under both.
    by_reason: Counter = field(default_factory=Counter)
    itm: Histogram = field(default_factory=lambda: Histogram.empty(ITM_RANGE, ITM_BINS))
    itc: Histogram = field(default_factory=lambda: Histogram.empty(ITC_RANGE, ITC_BINS))
    category_column: str | None = None
    category_problem: str | None = None
    # value -> [rows, flagged]
    categories: dict = field(default_factory=dict)
    # The most confident mismatches: scored rows that were flagged, lowest score first.
    examples: list[dict] = field(default_factory=list)
    # (status, error message) -> [rows, first example ids]; rows past MAX_ERROR_MESSAGES distinct messages
    # are counted in errors_untracked.
    errors: dict = field(default_factory=dict)
    errors_untracked: int = 0
    # --labels: the Categories and Policies sections' counts and examples (label_report.LabelStats)
    labels: object = None

    def add_errors(self, table: pa.Table, id_column: str) -> None:
        failed = table.filter(pc.is_valid(table.column("error")))
        if not failed.num_rows:
            return
        ids = failed.column(id_column).to_pylist() if id_column in failed.column_names else [None] * failed.num_rows
        for status, message, key in zip(failed.column("status").to_pylist(), failed.column("error").to_pylist(), ids):
            entry = self.errors.get((status, message))
            if entry is None:
                if len(self.errors) >= MAX_ERROR_MESSAGES:
                    self.errors_untracked += 1
                    continue
                entry = self.errors[(status, message)] = [0, []]
            entry[0] += 1
            if len(entry[1]) < ERROR_EXAMPLE_IDS:
                entry[1].append(key)

    def top_errors(self, n: int = ERROR_MESSAGES_SHOWN) -> list[tuple[str, str, int, list]]:
        """(status, message, rows, example ids), most frequent first (ties by message)."""
        ordered = sorted(self.errors.items(), key=lambda item: (-item[1][0], str(item[0][1]), str(item[0][0])))
        return [(status, message, rows, ids) for (status, message), (rows, ids) in ordered[:n]]

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.rows if self.rows else 0.0

    def quantiles(self) -> dict[str, float | None]:
        out = {}
        for name, histogram in (("itm", self.itm), ("itc", self.itc)):
            for q in QUANTILES:
                out[f"{name}_p{int(q * 100):02d}"] = histogram.quantile(q)
        return out


def _ranking_column(config: JobConfig) -> str:
    # With the ITM check off, ITC is what flagged the rows.
    return "itc_score" if config.itm_threshold is None and config.itc_threshold is not None else "itm_score"


def collect_stats(location: Location, files: list[str], config: JobConfig, examples: int = EXAMPLES) -> OutputStats:
    """One streaming pass over the committed files (names relative to ``location``)."""
    dataset = pads.dataset([location.join(name) for name in files], filesystem=location.filesystem, format="parquet")
    stats = OutputStats(category_column=config.report_category_column)
    names = dataset.schema.names
    category = config.report_category_column
    if category and category not in names:
        stats.category_problem = f"column {category!r} is not in the output (columns: {', '.join(names)})"
        category = None
    rank = _ranking_column(config)
    example_columns = [c for c in (config.id_column, config.text_column, "caption", "itm_score", "itc_score",
                                   "flag_reasons", "status", "error", "evidence") if c in names]
    error_columns = ["error"] + ([config.id_column] if config.id_column in names else []) if "error" in names else []
    label_columns = [c for c in label_report.label_columns(config) if c in names] if "labels" in names else []
    if label_columns:
        stats.labels = label_report.LabelStats(LabelSet(config.labels))
    columns = sorted(set(example_columns + error_columns + ["status", "flagged", "flag_reasons"] + ([category] if category else [])
                         + label_columns))
    heap: list[tuple] = []  # (-score, sequence, row): keeps the `examples` lowest scores
    sequence = 0
    for batch in dataset.to_batches(columns=columns):
        table = pa.Table.from_batches([batch])
        stats.rows += table.num_rows
        flagged = table.column("flagged")
        stats.flagged += int(pc.sum(flagged).as_py() or 0)
        reasons = pc.list_flatten(table.column("flag_reasons"))
        if len(reasons):
            reason_counts = pc.value_counts(reasons)
            stats.by_reason.update(dict(zip(reason_counts.field("values").to_pylist(), reason_counts.field("counts").to_pylist())))
        counts = pc.value_counts(table.column("status"))
        stats.by_status.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        if error_columns:
            stats.add_errors(table, config.id_column)
        ok = pc.equal(table.column("status"), "ok")
        for name, histogram in (("itm_score", stats.itm), ("itc_score", stats.itc)):
            values = table.column(name).filter(ok).drop_null().to_numpy()
            histogram.add(values)
        if category:
            grouped = table.select([category, "flagged"]).group_by(category, use_threads=False).aggregate(
                [("flagged", "count"), ("flagged", "sum")]
            )
            for value, count, flagged_sum in zip(*(grouped.column(c).to_pylist() for c in (category, "flagged_count", "flagged_sum"))):
                entry = stats.categories.setdefault(value, [0, 0])
                entry[0] += count
                entry[1] += int(flagged_sum or 0)
        if stats.labels is not None:
            stats.labels.add(table, example_columns)
        candidates = table.filter(pc.and_(ok, flagged)).select(example_columns)
        candidates = candidates.filter(pc.is_valid(candidates.column(rank)))
        if candidates.num_rows:
            best = candidates.take(pc.select_k_unstable(candidates, examples, [(rank, "ascending")]))
            for row in best.to_pylist():
                sequence += 1
                item = (-row[rank], sequence, row)
                if len(heap) < examples:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
    stats.examples = [row for _, _, row in sorted(heap, key=lambda item: (-item[0], item[1]))]
    return stats


def fetch_images(config: JobConfig, ids: list) -> dict:
    """The image bytes (or, with ``image_uri_column``, the images its URIs name) of the rows with
    these ids, read back from the input; the first row wins for a duplicated id.

    Bounded by the few examples, not by the input: a first pass reads only the id column, row
    group by row group, and the image column is read only from the row groups that hold a
    wanted id (at most one per id), and only until every id is found.
    """
    remaining = [i for i in dict.fromkeys(ids) if i is not None]
    if not remaining:
        return {}
    location = locate(config.input)
    dataset = pads.dataset(location.path, filesystem=location.filesystem, format="parquet", partitioning="hive")
    image_column = config.image_uri_column or config.image_column
    id_type = dataset.schema.field(config.id_column).type
    found: dict = {}
    for fragment in dataset.get_fragments():
        for row_group in fragment.split_by_row_group():
            keys = row_group.to_table(columns=[config.id_column], schema=dataset.schema).column(0)
            hits = pc.is_in(keys, value_set=pa.array(remaining, id_type)).fill_null(False)
            rows = np.flatnonzero(hits.to_numpy(zero_copy_only=False))
            if not len(rows):
                continue
            picked = row_group.to_table(columns=[config.id_column, image_column], schema=dataset.schema).take(rows)
            for key, value in zip(picked.column(0).to_pylist(), picked.column(1).to_pylist()):
                found.setdefault(key, value)
            remaining = [key for key in remaining if key not in found]
            if not remaining:
                break
        if not remaining:
            break
    if config.image_uri_column:
        return {key: _read_uri(value) for key, value in found.items()}
    return found


def _read_uri(value) -> bytes | None:
    if not value:
        return None
    try:
        return read_bytes(str(value))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# rendering

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .meta code { background: #f3f3f3; padding: 0 3px; }
table.totals { border-collapse: collapse; } table.totals td, table.totals th { padding: 3px 12px; border-bottom: 1px solid #eee; text-align: left; }
table.totals td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; } .chart { margin: 0; } .chart figcaption { color: #555; font-size: 12px; }
.bar { fill: #5b8def; } .threshold { stroke: #c62828; stroke-width: 2; stroke-dasharray: 5 3; } .axis { stroke: #999; }
svg text { font: 11px system-ui, sans-serif; fill: #444; } svg text.thr { fill: #c62828; }
.rate { display: inline-block; height: 10px; background: #e57373; vertical-align: middle; }
.note { color: #8a6d00; background: #fff8e1; padding: 6px 10px; border-radius: 4px; }
"""


def _fmt_pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def histogram_svg(histogram: Histogram, threshold: float | None, title: str, width: int = 480, height: int = 180) -> str:
    """Bars for the counts, the threshold as a dashed red line; labels at both ends and the threshold."""
    left, right, top, bottom = 36, 10, 10, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(1, int(histogram.counts.max(initial=0)))
    bar_w = plot_w / max(1, len(histogram.counts))
    span = histogram.high - histogram.low
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{views.esc(title)}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for index, count in enumerate(histogram.counts):
        if not count:
            continue
        h = plot_h * count / peak
        lo = histogram.low + index * span / len(histogram.counts)
        parts.append(
            f'<rect class="bar" x="{left + index * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>{lo:.3f} to {lo + span / len(histogram.counts):.3f}: {int(count)}</title></rect>'
        )
    for value, anchor in ((histogram.low, "start"), (histogram.high, "end")):
        x = left + plot_w * (value - histogram.low) / span
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" text-anchor="{anchor}">{value:.2f}</text>')
    if threshold is not None:
        x = left + plot_w * (threshold - histogram.low) / span
        parts.append(f'<line class="threshold" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}"/>')
        parts.append(f'<text class="thr" x="{x:.1f}" y="{height - 1}" text-anchor="middle">threshold {threshold:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _totals(stats: OutputStats) -> str:
    rows = [("rows", "rows", stats.rows)]
    rows += [(f"status-{status}", f"status {status}", count) for status, count in sorted(stats.by_status.items())]
    rows += [("flagged", "flagged", stats.flagged)]
    rows += [(f"reason-{reason}", f"flagged: {reason}", count) for reason, count in sorted(stats.by_reason.items())]
    cells = "".join(
        f'<tr><th>{views.esc(label)}</th><td class="num" data-count="{views.esc(key)}">{count}</td></tr>' for key, label, count in rows
    )
    cells += f'<tr><th>flag rate</th><td class="num" data-count="flag-rate">{_fmt_pct(stats.flag_rate)}</td></tr>'
    return f'<table class="totals">{cells}</table>'


def _categories(stats: OutputStats) -> str:
    if stats.category_problem:
        return f'<p class="note">{views.esc(stats.category_problem)}</p>'
    if not stats.category_column:
        return '<p class="meta">No category column chosen (set <code>report_category_column</code> / <code>--report-category-column</code>).</p>'
    ordered = sorted(stats.categories.items(), key=lambda item: (-item[1][0], str(item[0])))
    shown, rest = ordered[:MAX_CATEGORIES], ordered[MAX_CATEGORIES:]
    if rest:
        shown.append(("(%d other values)" % len(rest), [sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)]))
    body = []
    for value, (rows, flagged) in shown:
        rate = flagged / rows if rows else 0.0
        label = "(null)" if value is None else value
        body.append(
            f'<tr class="category"><th>{views.esc(label)}</th><td class="num">{rows}</td><td class="num">{flagged}</td>'
            f'<td class="num">{_fmt_pct(rate)}</td><td><span class="rate" style="width:{200 * rate:.0f}px"></span></td></tr>'
        )
    head = f"<tr><th>{views.esc(stats.category_column)}</th><th>rows</th><th>flagged</th><th>flag rate</th><th></th></tr>"
    return f'<table class="totals">{head}{"".join(body)}</table>'


def _errors(stats: OutputStats) -> str:
    if not stats.errors:
        return '<p class="meta" id="errors-note">No row has an error.</p>'
    shown = stats.top_errors()
    total = sum(rows for rows, _ in stats.errors.values()) + stats.errors_untracked
    body = "".join(
        f'<tr class="error-message"><td>{views.esc(status)}</td><td class="message">{views.esc(message)}</td>'
        f'<td class="num">{rows}</td><td class="ids">{", ".join(f"<code>{views.esc(i)}</code>" for i in ids)}</td></tr>'
        for status, message, rows, ids in shown
    )
    rest = len(stats.errors) - len(shown)
    note = f"{total} row{'s' if total != 1 else ''} with an error, {len(stats.errors)} distinct message{'s' if len(stats.errors) != 1 else ''}"
    if rest:
        note += f"; the {len(shown)} most frequent shown"
    if stats.errors_untracked:
        note += f"; {stats.errors_untracked} rows have messages past the first {MAX_ERROR_MESSAGES} distinct ones, not listed"
    head = "<tr><th>status</th><th>error</th><th>rows</th><th>example ids</th></tr>"
    return f'<p class="meta" id="errors-note">{note}.</p><table class="totals" id="errors">{head}{body}</table>'


def _evidence_note(examples: list[dict]) -> str:
    if not any(row.get("overlay") for row in examples):
        return ""
    return (" The evidence map is Grad-CAM of the ITM score: bright where the text's words attend in the "
            "image and raise the match score; the top words are the ones that attend most. A text that fits "
            "nothing in the image shows little or scattered heat.")


def render_report(
    manifest: dict, summary: dict, config: JobConfig, stats: OutputStats, thumbnails: dict, overlays: dict | None = None,
    history: History | None = None, shared: str = "",
) -> str:
    """The whole page. ``thumbnails``: id -> data URI for the examples; ``overlays``: id -> data URI of
    the evidence heat map over the image, for examples with evidence; ``history``: the run history
    (``history.read_history``), or None where no output location is known."""
    run_id = manifest.get("run_id") or summary.get("run_id")
    overlays = overlays or {}
    examples = []
    for row in stats.examples:
        key = row.get(config.id_column)
        examples.append(dict(row, id=key, text=row.get(config.text_column), thumbnail=thumbnails.get(key),
                             overlay=overlays.get(key) if row.get("evidence") else None))
    charts = "".join(
        f'<figure class="chart">{histogram_svg(hist.display(threshold), threshold, title)}'
        f"<figcaption>{views.esc(title)} over {hist.total} scored rows</figcaption></figure>"
        for hist, threshold, title in (
            (stats.itm, config.itm_threshold, "ITM score (probability of match)"),
            (stats.itc, config.itc_threshold, "ITC score (cosine similarity)"),
        )
    )
    elapsed = summary.get("elapsed_s")
    meta = [
        ("run", run_id), ("input", manifest.get("input", config.input)), ("output", summary.get("output", config.output)),
        ("ITM model", config.itm_model), ("caption model", config.recorded_caption_model or "none"),
        ("thresholds", f"itm < {config.itm_threshold}, itc < {config.itc_threshold}"),
        ("committed", manifest.get("committed_at", "")),
        ("duration", f"{elapsed:.1f}s" if isinstance(elapsed, (int, float)) else ""),
        ("schema version", manifest.get("schema_version", SCHEMA_VERSION)),
    ]
    meta_html = "<br>".join(f"{views.esc(k)}: <code>{views.esc(v)}</code>" for k, v in meta)
    rank = "ITC" if _ranking_column(config) == "itc_score" else "ITM"
    history_css = HISTORY_CSS
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>blip-moderate run {views.esc(run_id)}</title>"
        f"<style>{_CSS}{views.ROWS_CSS}{history_css}</style></head><body>"
        f"<h1>blip-moderate run report</h1><p class=\"meta\">{meta_html}</p>"
        f"<h2>Totals</h2>{_totals(stats)}"
        f"<h2>History</h2>{render_history(history or History(problem='no output location given: history not read'))}"
        f"<h2>Errors</h2>{_errors(stats)}"
        f"<h2>Score distributions</h2><div class=\"charts\">{charts}</div>"
        f"<h2>Flag rate by category</h2>{_categories(stats)}"
        f"<h2>Categories</h2>{label_report.render_categories(stats.labels, config, thumbnails)}"
        f"<h2>Policies</h2>{label_report.render_policies(stats.labels, config, thumbnails)}"
        f"<h2>Most confident mismatches</h2><p class=\"meta\">Scored rows that were flagged, lowest {rank} score first "
        f"({len(examples)} shown).{_evidence_note(examples)}</p><div id=\"examples\">{views.rows_table(examples)}</div>"
        + (f"<h2>Images shared across listings</h2><div id=\"shared-images\">{shared}</div>" if shared else "")
        + "</body></html>\n"
    )


def report_page(manifest: dict, summary: dict, config: JobConfig, stats: OutputStats, location: Location | None = None,
                agree=None) -> str:
    """The page for already collected ``stats``: fetches the examples' images, reads the run history
    beside ``location`` (the output, or its partition) and renders."""
    ids = [row.get(config.id_column) for row in stats.examples]
    if stats.labels is not None:
        ids += stats.labels.example_ids(config.id_column)
    images = fetch_images(config, ids)
    thumbnails = {key: views.thumbnail_uri(data) for key, data in images.items()}
    overlays = {}
    for row in stats.examples:
        key = row.get(config.id_column)
        if row.get("evidence") and key not in overlays:
            overlays[key] = views.overlay_uri(images.get(key), row["evidence"])
    history = read_history(location) if location is not None else None
    shared = _shared_images(manifest, config, location, agree)
    return render_report(manifest, summary, config, stats, thumbnails, overlays, history, shared)


def _shared_images(manifest: dict, config: JobConfig, location: Location | None, agree=None) -> str:
    """The "Images shared across listings" section (``shared_images``) for a --near-duplicates output; "" otherwise.
    ``agree``: how the groups' texts are compared (``shared_images.text_agreement``), or None."""
    if location is None or not getattr(config, "near_duplicates", False):
        return ""
    from . import shared_images

    groups = shared_images.largest_groups(location, manifest.get("files", []), config)
    ids = [row.get(config.id_column) for group in groups for row in group["rows"]]
    thumbnails = {key: views.thumbnail_uri(data) for key, data in fetch_images(config, ids).items()}
    agreement = shared_images.text_agreement(groups, config, agree)
    return shared_images.render(groups, agreement, thumbnails, config)


def build_report(location: Location, manifest: dict, summary: dict, config: JobConfig) -> str:
    """Read a committed output (and a few input images) and render its page."""
    return report_page(manifest, summary, config, collect_stats(location, manifest.get("files", []), config), location)
