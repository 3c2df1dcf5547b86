"""The report's "Images shared across listings" section (``--near-duplicates`` outputs).

Two streaming passes over the committed files, whatever their size: the first keeps the ``GROUPS``
largest groups (every row carries its group's size, so a bounded candidate set suffices), the
second the first ``ROWS_PER_GROUP`` rows of each. Whether a group's texts agree is the mean cosine
of its texts' sentence embeddings, with caption agreement's model (all-MiniLM-L6-v2: about a
millisecond a text on a CPU, so a few dozen texts cost nothing) run in a Ray task when Ray is up
(the report is built right after a run, on the driver, where no model may load); without Ray the
page says it was not computed rather than load a model here.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..schema import IMAGE_GROUP, IMAGE_GROUP_SIZE
from . import views

GROUPS = 8
ROWS_PER_GROUP = 6


def largest_groups(location, files: list[str], config, groups: int = GROUPS, rows: int = ROWS_PER_GROUP) -> list[dict]:
    """``[{"group", "size", "images", "rows": [...]}]``, largest first (ties by group), for groups of 2+ rows."""
    dataset = pads.dataset([location.join(name) for name in files], filesystem=location.filesystem, format="parquet")
    if IMAGE_GROUP not in dataset.schema.names:
        return []
    sizes: dict[str, int] = {}
    for batch in dataset.to_batches(columns=[IMAGE_GROUP, IMAGE_GROUP_SIZE]):
        table = pa.Table.from_batches([batch])
        table = table.filter(pc.fill_null(pc.greater(table.column(IMAGE_GROUP_SIZE), 1), False))
        for group, size in zip(table.column(IMAGE_GROUP).to_pylist(), table.column(IMAGE_GROUP_SIZE).to_pylist()):
            sizes[group] = size
        if len(sizes) > 8 * groups:  # bounded: keep the best candidates only
            sizes = dict(sorted(sizes.items(), key=lambda item: (-item[1], item[0]))[: 2 * groups])
    chosen = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))[:groups]
    if not chosen:
        return []
    wanted = pa.array([g for g, _ in chosen], pa.string())
    columns = [c for c in (config.id_column, config.text_column, "image_sha256", IMAGE_GROUP, "itm_score", "itc_score",
                           "caption", "status", "flag_reasons") if c in dataset.schema.names]
    found: dict[str, list[dict]] = {g: [] for g, _ in chosen}
    images: dict[str, set] = {g: set() for g, _ in chosen}
    for batch in dataset.to_batches(columns=columns, filter=pc.field(IMAGE_GROUP).isin(wanted)):
        for row in batch.to_pylist():
            images[row[IMAGE_GROUP]].add(row.get("image_sha256"))
            if len(found[row[IMAGE_GROUP]]) < rows:
                found[row[IMAGE_GROUP]].append(row)
    return [{"group": g, "size": size, "images": len(images[g]), "rows": found[g]} for g, size in chosen]


def text_agreement(groups: list[dict], config, agree) -> dict[str, float]:
    """Group -> mean pairwise cosine of its shown rows' texts; {} when not computed. ``agree`` (texts
    by group -> that mapping) runs the sentence model where models run, never here: the orchestrator
    passes ``pipelines.dataflow.dedup.group_text_agreement`` (a Ray task), or None."""
    if agree is None:
        return {}
    texts = {g["group"]: [r.get(config.text_column) for r in g["rows"] if isinstance(r.get(config.text_column), str)]
             for g in groups}
    return agree(texts)


def render(groups: list[dict], agreement: dict[str, float], thumbnails: dict, config) -> str:
    """The section's HTML: per group, its size, its distinct files, whether its texts agree, and its rows."""
    if not groups:
        return '<p class="meta">No image is shared by two or more rows (or the run was not asked for --near-duplicates).</p>'
    parts = ['<p class="meta">Rows whose images are the same file or nearly the same picture (image-embedding cosine at '
             'or above the run\'s threshold), largest groups first. Text agreement is the mean cosine between the '
             'listings\' texts (all-MiniLM-L6-v2): near 1, one product; low, one photo behind unrelated listings.</p>']
    for group in groups:
        value = agreement.get(group["group"])
        agree = f"texts agree {value:.2f}" if value is not None else "text agreement not computed"
        rows = [dict(r, id=r.get(config.id_column), text=r.get(config.text_column),
                     thumbnail=thumbnails.get(r.get(config.id_column))) for r in group["rows"]]
        parts.append(
            f'<h3 class="group">group <code>{views.esc(group["group"][:16])}</code>: {views.esc(group["size"])} rows, '
            f'{views.esc(group["images"])} distinct files; {views.esc(agree)}</h3>{views.rows_table(rows)}'
        )
    return "".join(parts)
