"""HTML pieces shared by the run report and the notebook views. No model code, no Ray.

Catalog values (ids, texts, captions, errors, category values) are untrusted: every one goes
through ``esc``. Images are embedded as small JPEG data URIs so a page is one self-contained
file that reads offline and loads nothing from the network. Why these pages are Python strings
and ``esc`` rather than Jinja2 templates: ``report.py``'s docstring.
"""

from __future__ import annotations

import base64
import html
import io
import math

from PIL import Image

from blip_ops.heatmap import overlay
from blip_ops.images import ImageError, decode_rgb

THUMBNAIL_PX = 128
# Evidence overlays are drawn a little larger than thumbnails: the heat must be readable.
OVERLAY_PX = 160


def esc(value) -> str:
    """Text for HTML content and attribute values; ``None`` shows as an empty string."""
    return "" if value is None else html.escape(str(value), quote=True)


def thumbnail_uri(data: bytes | None, size: int = THUMBNAIL_PX) -> str | None:
    """A ``data:image/jpeg`` URI of the image shrunk to ``size`` px, or None when it cannot be decoded.

    Decoding goes through the same guarded decoder as scoring (format allow-list, bomb guard),
    since these bytes are as untrusted as the ones the job scores.
    """
    if not data:
        return None
    try:
        image = Image.fromarray(decode_rgb(bytes(data)))
    except ImageError:
        return None
    image.thumbnail((size, size))
    return _jpeg_uri(image)


def _jpeg_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_uri(data: bytes | None, evidence, size: int = OVERLAY_PX) -> str | None:
    """A ``data:image/jpeg`` URI of the evidence heat map over the image (``blip_ops.heatmap.overlay``,
    with its legend), or None without an image or evidence."""
    if not data or evidence is None:
        return None
    try:
        image = Image.fromarray(decode_rgb(bytes(data)))
    except ImageError:
        return None
    return _jpeg_uri(overlay(image, evidence, max_size=size))


def _words(evidence) -> str:
    """The evidence's top words as chips, heaviest first; each chip's weight relative to the first."""
    words = (evidence or {}).get("words")
    words = [] if words is None else list(words)  # a list, or a numpy array from pandas
    if not words:
        return ""
    top = max(float(w["weight"]) for w in words) or 1.0
    chips = "".join(
        f'<span class="word" title="weight {float(w["weight"]):.3g}" style="opacity:{0.45 + 0.55 * float(w["weight"]) / top:.2f}">'
        f'{esc(w["word"])}</span>'
        for w in words
    )
    return f'<div class="words">top words: {chips}</div>'


def _score(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    return f"{float(value):.3f}"


ROWS_CSS = """
table.bm-rows { border-collapse: collapse; font: 13px/1.4 system-ui, sans-serif; }
table.bm-rows th, table.bm-rows td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
table.bm-rows td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.bm-rows img { max-width: 128px; max-height: 128px; display: block; }
table.bm-rows .noimg { color: #888; font-style: italic; }
table.bm-rows .reason { display: inline-block; background: #fde2e1; color: #8a1c14; border-radius: 3px; padding: 0 4px; margin: 1px; }
table.bm-rows img.overlay { max-width: 160px; max-height: 180px; }
table.bm-rows .words { margin-top: 4px; color: #555; font-size: 12px; }
table.bm-rows .word { display: inline-block; background: #3b1c5a; color: #fff; border-radius: 3px; padding: 0 4px; margin: 1px; }
"""


# Labels shown per row (--labels): the strongest few of a row's list, by ITM.
LABELS_SHOWN = 4


def labels_cell(row: dict) -> str:
    """A row's labels (``--labels``): declared category, prediction with its rank, the strongest labels."""
    items = row.get("labels")
    if items is None or (not isinstance(items, list) and not len(items)):
        return '<span class="noimg">no labels</span>'
    parts = []
    if row.get("category_predicted") is not None:
        declared = row.get("category")
        score, rank = row.get("category_score"), row.get("category_rank")
        known = f" (declared: {esc(declared)}, ITM {_score(score)}, rank {esc(rank)})" if score is not None else (
            f" (declared: {esc(declared)})" if declared is not None else "")
        parts.append(f"<div>predicted <b>{esc(row['category_predicted'])}</b>{known}</div>")
    for item in list(items)[:LABELS_SHOWN]:
        parts.append(f'<div class="label">{esc(item["kind"])}: {esc(item["name"])} {_score(item["itm"])}</div>')
    return "".join(parts)


def rows_table(rows: list[dict]) -> str:
    """A table of scored rows. Each row: id, text, caption, itm_score, itc_score, status, error,
    flag_reasons, ``thumbnail`` (a data URI or None) and, optionally, ``evidence`` (the output's
    struct) and ``overlay`` (its data URI), and ``labels`` (with ``category_predicted``,
    ``category_score``, ``category_rank`` and the declared ``category``). The evidence column appears
    when any row has an overlay, the labels column when any row has labels; the top words go under the caption."""
    with_labels = any(row.get("labels") is not None for row in rows)
    with_evidence = any(row.get("overlay") for row in rows)
    evidence_head = "<th>evidence (ITM Grad-CAM)</th>" if with_evidence else ""
    labels_head = "<th>labels</th>" if with_labels else ""
    head = (f"<tr><th>image</th>{evidence_head}<th>id</th><th>text</th><th>caption</th><th>ITM</th><th>ITC</th>"
            f"{labels_head}<th>reasons</th></tr>")
    body = []
    for row in rows:
        thumb = row.get("thumbnail")
        image = f'<img src="{esc(thumb)}" alt="">' if thumb else '<span class="noimg">no image</span>'
        reasons = "".join(f'<span class="reason">{esc(r)}</span>' for r in (row.get("flag_reasons") or []))
        if row.get("error"):
            reasons += f"<div>{esc(row['error'])}</div>"
        evidence = ""
        if with_evidence:
            shown = row.get("overlay")
            layer = (row.get("evidence") or {}).get("layer")
            evidence = (
                f'<td><img class="overlay" src="{esc(shown)}" alt="evidence heat map" '
                f'title="where the text lands in the image (cross-attention layer {esc(layer)})"></td>'
                if shown else '<td><span class="noimg">no evidence</span></td>'
            )
        body.append(
            "<tr class=\"bm-row\">"
            f"<td>{image}</td>{evidence}<td>{esc(row.get('id'))}</td><td class=\"text\">{esc(row.get('text'))}</td>"
            f"<td class=\"caption\">{esc(row.get('caption'))}{_words(row.get('evidence'))}</td>"
            f"<td class=\"num\">{_score(row.get('itm_score'))}</td><td class=\"num\">{_score(row.get('itc_score'))}</td>"
            f"{f'<td class=labels>{labels_cell(row)}</td>' if with_labels else ''}<td>{reasons}</td></tr>"
        )
    return f'<table class="bm-rows"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
