"""The label file (``--labels FILE``, a ``labels:`` block): categories and policies, checked once.

A bad file is a usage error found before any model loads: every message names the key at fault
(``categories.top_k``, ``policies[1].threshold``...). The parsed file is a plain, JSON-able dict
(``parse_labels``), so it travels in ``JobConfig`` and the manifest and reaches the actors as
config; ``LabelSet`` is its view with the name lookups built once.

Names are matched after ``strip()`` and ``casefold()``: "Sofa " and "sofa" are one name, so a file
listing both is refused (duplicate), and a declared "SOFA" is the category "sofa". A ``file:``
list (one name a line; blank lines and ``#`` lines skipped) is read here, from a local path or any
store ``pipelines.storage`` reads, so a 10,000-name taxonomy is one small file, not YAML.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

# BLIP's own prompt (LAVIS BlipCaptionProcessor, prompt="a picture of "): the name follows it.
DEFAULT_PROMPT = "a picture of {}"
DEFAULT_TOP_K = 3
DEFAULT_CATEGORY_THRESHOLD = 0.5
DEFAULT_POLICY_THRESHOLD = 0.5

_TOP_KEYS = {"prompt", "categories", "policies"}
_CATEGORY_KEYS = {"column", "names", "file", "aliases", "top_k", "threshold"}
_POLICY_KEYS = {"name", "prompts", "threshold", "itc_gate"}


class LabelError(ValueError):
    """A label file that cannot run; the message starts with the key at fault."""


def match_key(value) -> str | None:
    """The form names and declared values are compared in; None for a missing or blank value."""
    if value is None or not isinstance(value, str):
        return None
    key = value.strip().casefold()
    return key or None


def _threshold(value, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LabelError(f"{where}: must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise LabelError(f"{where}: must be in [0, 1], got {value}")
    return float(value)


def _unknown(data: dict, allowed: set, where: str) -> None:
    extra = sorted(str(k) for k in data if k not in allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise LabelError(f"{prefix}{extra[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _read_names(uri: str) -> list[str]:
    from .storage import read_bytes

    try:
        text = read_bytes(uri).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise LabelError(f"categories.file: cannot read {uri}: {exc}") from None
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _names(categories: dict, base: Path | None) -> list[str]:
    if ("names" in categories) == ("file" in categories):
        raise LabelError("categories.names: give names (a list) or file (one name a line), exactly one of them")
    if "file" in categories:
        uri = categories["file"]
        if not isinstance(uri, str) or not uri.strip():
            raise LabelError("categories.file: must be a path or URI")
        uri = uri.strip()
        if base is not None and "://" not in uri and not Path(uri).is_absolute():
            uri = str(base / uri)  # relative to the label file, as a person reading it expects
        names, where = _read_names(uri), "categories.file"
    else:
        names, where = categories["names"], "categories.names"
        if not isinstance(names, list):
            raise LabelError(f"{where}: must be a list of names")
    if not names:
        raise LabelError(f"{where}: no names")
    out, seen = [], {}
    for index, name in enumerate(names):
        if isinstance(name, (int, float)) and not isinstance(name, bool):
            name = str(name)  # a YAML name like 42 is the name "42"
        key = match_key(name)
        if key is None:
            raise LabelError(f"{where}[{index}]: empty name")
        if key in seen:
            raise LabelError(f"{where}[{index}]: duplicate name {name.strip()!r} (same as [{seen[key]}] after strip and casefold)")
        seen[key] = index
        out.append(name.strip())
    return out


def _categories(categories, base: Path | None) -> dict:
    if not isinstance(categories, dict):
        raise LabelError("categories: must be a mapping (column, names or file, aliases, top_k, threshold)")
    _unknown(categories, _CATEGORY_KEYS, "categories")
    column = categories.get("column")
    if not isinstance(column, str) or not column.strip():
        raise LabelError("categories.column: missing (the input column holding the declared category)")
    names = _names(categories, base)
    keys = {match_key(n): n for n in names}
    aliases = categories.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise LabelError("categories.aliases: must be a mapping of declared value: name")
    resolved = {}
    for alias, name in aliases.items():
        where = f"categories.aliases.{alias}"
        alias_key, name_key = match_key(str(alias)), match_key(name if isinstance(name, str) else None)
        if alias_key is None:
            raise LabelError(f"{where}: empty alias")
        if name_key not in keys:
            raise LabelError(f"{where}: {name!r} is not one of the names")
        if alias_key in keys:
            raise LabelError(f"{where}: {alias!r} is already a name")
        if alias_key in resolved:
            raise LabelError(f"{where}: duplicate alias after strip and casefold")
        resolved[alias_key] = keys[name_key]
    top_k = categories.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise LabelError(f"categories.top_k: must be an integer of at least 1, got {top_k!r}")
    return {
        "column": column.strip(),
        "names": names,
        "aliases": dict(sorted(resolved.items())),
        "top_k": top_k,
        "threshold": _threshold(categories.get("threshold"), "categories.threshold", DEFAULT_CATEGORY_THRESHOLD),
    }


def _policies(policies) -> list[dict]:
    if not isinstance(policies, list):
        raise LabelError("policies: must be a list of {name, prompts, threshold}")
    out, seen = [], set()
    for index, policy in enumerate(policies):
        where = f"policies[{index}]"
        if not isinstance(policy, dict):
            raise LabelError(f"{where}: must be a mapping (name, prompts, threshold)")
        _unknown(policy, _POLICY_KEYS, where)
        name = match_key(policy.get("name"))
        if name is None:
            raise LabelError(f"{where}.name: empty name")
        if name in seen:
            raise LabelError(f"{where}.name: duplicate policy {policy['name'].strip()!r}")
        seen.add(name)
        prompts = policy.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise LabelError(f"{where}.prompts: must be a non-empty list of texts")
        for p, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise LabelError(f"{where}.prompts[{p}]: empty prompt")
        gate = policy.get("itc_gate")
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not -1.0 <= gate <= 1.0):
            raise LabelError(f"{where}.itc_gate: must be a cosine in [-1, 1], got {gate!r}")
        out.append({
            "name": policy["name"].strip(),
            "prompts": [p.strip() for p in prompts],
            "threshold": _threshold(policy.get("threshold"), f"{where}.threshold", DEFAULT_POLICY_THRESHOLD),
            # ITM only where the policy's best prompt ITC reaches it (None: always); gated out: itm null
            "itc_gate": None if gate is None else float(gate),
        })
    return out


def parse_labels(value, base: Path | None = None) -> dict | None:
    """A label file's path, or its mapping (a ``labels:`` block), as the checked plain dict; None
    for None. ``base``: the directory a relative ``categories.file`` is read from."""
    if value is None:
        return None
    if isinstance(value, str) and "://" in value and not value.startswith("file://"):
        # An object-store label file (s3://, gs://, az://: pipelines.storage); a relative
        # categories.file beside it is not looked up there.
        from .storage import read_bytes

        try:
            data = yaml.safe_load(read_bytes(value).decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise LabelError(f"cannot read label file {value}: {exc}") from None
        return parse_labels(data if data is not None else {}, None)
    if isinstance(value, (str, Path)):
        path = Path(value.removeprefix("file://") if isinstance(value, str) else value)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise LabelError(f"cannot read label file {value}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise LabelError(f"label file {value} is not valid YAML: {exc}") from None
        return parse_labels(data if data is not None else {}, path.parent)
    if not isinstance(value, dict):
        raise LabelError("must be a label file path or a mapping (prompt, categories, policies)")
    _unknown(value, _TOP_KEYS, "")
    if "categories" not in value and "policies" not in value:
        raise LabelError("categories: a label file needs categories, policies or both")
    prompt = value.get("prompt", DEFAULT_PROMPT)
    if not isinstance(prompt, str) or not prompt.strip() or prompt.count("{}") > 1:
        raise LabelError(f"prompt: must be a text with at most one {{}} (where the name goes), got {prompt!r}")
    categories = _categories(value["categories"], base) if value.get("categories") is not None else None
    policies = _policies(value["policies"]) if value.get("policies") is not None else []
    if categories is None and not policies:
        raise LabelError("policies: empty, and no categories")
    return {"prompt": prompt, "categories": categories, "policies": policies}


def prompt_text(template: str, name: str) -> str:
    """A category's prompt: the name where ``{}`` is, or after the template (LAVIS's prefix form)."""
    return template.replace("{}", name) if "{}" in template else template + name


def content_digest(labels: dict) -> str:
    """What a row's label values depend on in the file: the prompt, names, aliases, top_k and policy
    prompts. Thresholds decide flags only, and the column's name only where the values come
    from: both are left out."""
    categories = labels.get("categories")
    body = {
        "prompt": labels["prompt"],
        "names": categories["names"] if categories else None,
        "aliases": categories["aliases"] if categories else None,
        "top_k": categories["top_k"] if categories else None,
        # the gate decides which policy ITMs exist: in the key (absent when off, as before it existed)
        "policies": [[p["name"], p["prompts"]] + ([p["itc_gate"]] if p.get("itc_gate") is not None else [])
                     for p in labels["policies"]],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


class LabelSet:
    """A parsed label dict with its lookups: declared value -> name index (aliases included)."""

    def __init__(self, labels: dict):
        self.labels = labels
        self.prompt = labels["prompt"]
        categories = labels.get("categories")
        self.column = categories["column"] if categories else None
        self.names = list(categories["names"]) if categories else []
        self.top_k = categories["top_k"] if categories else 0
        self.category_threshold = categories["threshold"] if categories else None
        self.policies = labels["policies"]
        self._index = {match_key(n): i for i, n in enumerate(self.names)}
        for alias, name in (categories["aliases"] if categories else {}).items():
            self._index[alias] = self._index[match_key(name)]

    def declared_index(self, value) -> int | None:
        """The name a declared value means; None for a missing or blank value, -1 for an unknown one."""
        key = match_key(value)
        if key is None:
            return None
        return self._index.get(key, -1)

    def category_prompts(self) -> list[str]:
        return [prompt_text(self.prompt, name) for name in self.names]

    def key_token(self, value) -> str:
        """A declared value as the label key sees it: the name it means, or "-" (none or unknown:
        the row then gets no category score or rank, so all such values share one key)."""
        index = self.declared_index(value)
        return self.names[index] if index is not None and index >= 0 else "-"
