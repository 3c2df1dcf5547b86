"""Labels in the pipeline: the score stage's label columns and the flag rule for them.

The label file reaches the actors as JSON text (hashable, so warm audit actors are keyed by it like
any other setting); ``blip_ops.labels.Labeller`` does the model work on the scoring pass's image
embeddings. Flags are decided here, from the values and this run's thresholds, so a reused value is
flagged at the thresholds of the run that reuses it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .. import schema as S
from ..labels import LabelSet


def label_set(labels: str | dict | None) -> LabelSet | None:
    if labels is None:
        return None
    return LabelSet(json.loads(labels) if isinstance(labels, str) else labels)


def as_json(labels: dict | None) -> str | None:
    return None if labels is None else json.dumps(labels, sort_keys=True)


def make_labeller(scorer, labels: LabelSet):
    from blip_ops.labels import Labeller

    return Labeller(
        scorer, labels.names, labels.category_prompts(), labels.top_k,
        [(p["name"], p["prompts"]) for p in labels.policies], [p.get("itc_gate") for p in labels.policies],
    )


def declared_indices(labels: LabelSet, values: list) -> list[int | None]:
    """Per row the index of the name its declared value means; None where none or unknown."""
    out = []
    for value in values:
        index = labels.declared_index(value)
        out.append(index if index is not None and index >= 0 else None)
    return out


def label_columns(results: list, rows: np.ndarray, n: int) -> dict[str, pa.Array]:
    """The label columns for ``n`` rows from ``results`` (``RowLabels``) at positions ``rows``; null elsewhere."""
    predicted, score, rank, labels = [None] * n, [None] * n, [None] * n, [None] * n
    for row, result in zip(rows, results):
        if result is None:  # not labelled here (the keyed plan labels each (image, category) once)
            continue
        predicted[row], score[row], rank[row], labels[row] = result.predicted, result.score, result.rank, result.labels
    types = {field.name: field.type for field in S.LABEL_FIELDS}
    return {
        "category_predicted": pa.array(predicted, types["category_predicted"]),
        "category_score": pa.array(score, types["category_score"]),
        "category_rank": pa.array(rank, types["category_rank"]),
        "labels": pa.array(labels, types["labels"]),
    }


def null_label_columns(n: int) -> dict[str, pa.Array]:
    return {field.name: pa.nulls(n, field.type) for field in S.LABEL_FIELDS}


def label_reasons(labels: LabelSet, declared, predicted, score, row_labels) -> list[str]:
    """The label flags of one scored row (the issue's definitions, in this order):
    ``category_unknown`` (a declared value that is neither a name nor an alias; a blank one is not
    checked), ``category_mismatch`` (a known declared name, another predicted, and its ITM below
    ``categories.threshold``), ``policy:<name>`` (the policy's score at or above its threshold)."""
    reasons = []
    if labels.names:
        index = labels.declared_index(declared)
        if index == -1:
            reasons.append(S.REASON_CATEGORY_UNKNOWN)
        elif index is not None and predicted is not None and score is not None:
            if predicted != labels.names[index] and score < labels.category_threshold:
                reasons.append(S.REASON_CATEGORY_MISMATCH)
    if row_labels:
        scores = {item["name"]: item["itm"] for item in row_labels if item["kind"] == "policy"}
        for policy in labels.policies:
            value = scores.get(policy["name"])
            if value is not None and value >= policy["threshold"]:
                reasons.append(S.POLICY_PREFIX + policy["name"])
    return reasons
