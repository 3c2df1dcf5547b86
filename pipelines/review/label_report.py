"""The run report's Categories and Policies sections (``--labels``), collected in the report's one
streaming pass: declared-vs-predicted confusions, the strongest mismatches, hits per policy, each
with a few example rows (thumbnails drawn by ``report.report_page``). Bounded memory: counters over
(declared, predicted) pairs and policy names, and a small heap of examples per list.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from .. import schema as S
from ..labels import LabelSet
from . import views

CONFUSIONS_SHOWN = 15
EXAMPLES = 8


def label_columns(config) -> list[str]:
    """The output columns the sections read (empty without labels)."""
    if config.labels is None:
        return []
    column = (config.labels.get("categories") or {}).get("column")
    return [*S.LABEL_COLUMNS, *([column] if column else [])]


def _push(heap: list, size: int, key: float, sequence: int, row: dict) -> None:
    item = (key, -sequence, row)
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _ordered(heap: list) -> list[dict]:
    return [row for _, _, row in sorted(heap, key=lambda item: (item[0], item[1]), reverse=True)]


@dataclass
class LabelStats:
    labels: LabelSet
    confusions: Counter = field(default_factory=Counter)  # (declared name, predicted) -> mismatched rows
    declared_rows: Counter = field(default_factory=Counter)  # declared name -> scored rows declaring it
    unknown: int = 0
    policy_hits: Counter = field(default_factory=Counter)
    _mismatches: list = field(default_factory=list)  # heap: lowest category_score kept (as -score)
    _policy_examples: dict = field(default_factory=dict)  # name -> heap of the highest policy scores
    _sequence: int = 0

    def add(self, table: pa.Table, example_columns: list[str]) -> None:
        ok = table.filter(pc.fill_null(pc.equal(table.column("status"), S.STATUS_OK), False))
        if not ok.num_rows:
            return
        column = self.labels.column
        declared = ok.column(column).to_pylist() if column and column in ok.column_names else [None] * ok.num_rows
        keep = [c for c in dict.fromkeys(example_columns + S.LABEL_COLUMNS + ([column] if column else [])) if c in ok.column_names]
        rows = ok.select(keep).to_pylist()
        for value, row in zip(declared, rows):
            self._sequence += 1
            reasons = row.get("flag_reasons") or []
            index = self.labels.declared_index(value)
            if index is not None and index >= 0:
                name = self.labels.names[index]
                self.declared_rows[name] += 1
                if S.REASON_CATEGORY_MISMATCH in reasons:
                    self.confusions[(name, row.get("category_predicted"))] += 1
                    _push(self._mismatches, EXAMPLES, -(row.get("category_score") or 0.0), self._sequence,
                          dict(row, category=value))
            elif index == -1:
                self.unknown += 1
            for reason in reasons:
                if reason.startswith(S.POLICY_PREFIX):
                    policy = reason[len(S.POLICY_PREFIX):]
                    self.policy_hits[policy] += 1
                    score = max((i["itm"] for i in row.get("labels") or []
                                 if i["kind"] == "policy" and i["name"] == policy and i["itm"] is not None), default=0.0)
                    _push(self._policy_examples.setdefault(policy, []), EXAMPLES, score, self._sequence,
                          dict(row, category=value))

    @property
    def mismatches(self) -> list[dict]:
        return _ordered(self._mismatches)

    def policy_examples(self, policy: str) -> list[dict]:
        return _ordered(self._policy_examples.get(policy, []))

    def example_ids(self, id_column: str) -> list:
        rows = self.mismatches + [row for p in self._policy_examples for row in self.policy_examples(p)]
        return [row.get(id_column) for row in rows]


def _example_rows(rows: list[dict], config, thumbnails: dict) -> list[dict]:
    return [dict(row, id=row.get(config.id_column), text=row.get(config.text_column),
                  thumbnail=thumbnails.get(row.get(config.id_column))) for row in rows]


def render_categories(stats: LabelStats | None, config, thumbnails: dict) -> str:
    if stats is None:
        return '<p class="meta">No label file (<code>--labels</code>): no categories checked.</p>'
    if not stats.labels.names:
        return '<p class="meta">The label file has no categories.</p>'
    mismatched = sum(stats.confusions.values())
    declared = sum(stats.declared_rows.values())
    head = (f'<p class="meta">{mismatched} of {declared} scored rows declaring a known category were flagged '
            f'{S.REASON_CATEGORY_MISMATCH}; {stats.unknown} declared a category not in the label file '
            f'({S.REASON_CATEGORY_UNKNOWN}).</p>')
    rows = "".join(
        f"<tr><td>{views.esc(declared_name)}</td><td>{views.esc(predicted)}</td><td class=\"num\">{count}</td></tr>"
        for (declared_name, predicted), count in sorted(stats.confusions.items(), key=lambda kv: (-kv[1], str(kv[0])))[:CONFUSIONS_SHOWN]
    )
    table = (f'<table class="totals"><tr><th>declared</th><th>predicted</th><th>rows</th></tr>{rows}</table>'
             if rows else '<p class="meta">No mismatches.</p>')
    examples = _example_rows(stats.mismatches, config, thumbnails)
    shown = (f'<h3>Top mismatches</h3><p class="meta">Lowest ITM of the declared category first ({len(examples)} shown).</p>'
             f"{views.rows_table(examples)}" if examples else "")
    return f"{head}<h3>Most frequent confusions</h3>{table}{shown}"


def render_policies(stats: LabelStats | None, config, thumbnails: dict) -> str:
    if stats is None:
        return '<p class="meta">No label file (<code>--labels</code>): no policies checked.</p>'
    if not stats.labels.policies:
        return '<p class="meta">The label file has no policies.</p>'
    out = []
    for policy in stats.labels.policies:
        name = policy["name"]
        hits = stats.policy_hits.get(name, 0)
        out.append(f"<h3>{views.esc(name)}: {hits} rows at ITM &ge; {policy['threshold']}</h3>")
        examples = _example_rows(stats.policy_examples(name), config, thumbnails)
        if examples:
            out.append(f'<p class="meta">Strongest first ({len(examples)} shown).</p>{views.rows_table(examples)}')
    return "".join(out)
