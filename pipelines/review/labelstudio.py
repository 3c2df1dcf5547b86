"""The review queue round trip: Label Studio tasks out of a committed output, verdicts back in.

``export_tasks`` writes one task per selected row (default: the flagged rows) of a committed
output, Parquet or Delta (read through ``commit.reader.committed_files``), lowest ITM first, with
the job's own verdict as a prediction, and the labeling config those tasks need. ``import_verdicts``
reads a Label Studio JSON export back into a verdicts table that ``jobs.calibrate`` takes as labels.

The one non-obvious decision is **how a task names its image**, since Label Studio shows what the
reviewer's browser can load and the output holds no image bytes. One rule, per row:

1. an ``s3://`` URI (``--image-uri-column`` outputs) stays as it is: a Label Studio S3 source
   storage on that bucket serves it as a presigned URL;
2. a local path under ``--image-root DIR`` becomes ``/data/local-files/?d=<path relative to DIR>``,
   for Label Studio started with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
   ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=DIR`` (and a local storage on a folder under DIR);
   a path outside DIR is refused;
3. anything else (images stored as bytes in the input, or local paths without ``--image-root``)
   is embedded as a JPEG data URL shrunk to ``INLINE_PX``, read back from the input by id, and
   only for small exports: above ``INLINE_MAX_TASKS`` such tasks the export is refused (pass
   ``--limit``, or keep images as files). About 30-60 KB a task, so 1,000 tasks stay a file
   Label Studio imports in one request.

Evidence overlays (the Grad-CAM map over the image, ``blip_ops.heatmap``) are always data URLs,
drawn here from the image bytes; a row without evidence shows a "no evidence map" placeholder,
because Label Studio refuses a task that lacks a ``$variable`` of its config.

Verdicts: the latest non-cancelled annotation of each task wins; a later import of an
overlapping export replaces a task's verdict only with a newer one, so importing the same
export twice changes nothing. The table is one Parquet file written to a temporary name and
renamed into place.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ..config import JobConfig
from ..storage import locate, read_bytes
from . import views
from .report import fetch_images
from .where import WhereError, parse

VERDICT_FIELD = "verdict"  # the Choices name, in the config, the predictions and the annotations
# --labels outputs: the reviewer's category (one of the task's short list, its declared category, or
# "other") and the policies they see in the image (a checklist), both prefilled from the prediction.
CATEGORY_FIELD = "category"
POLICIES_FIELD = "policies"
OTHER_CATEGORY = "other"
VERDICTS = ("match", "mismatch", "unsure")
DEFAULT_WHERE = "flagged"
INLINE_MAX_TASKS = 1000
INLINE_PX = 512
EVIDENCE_PX = 384
LOCAL_FILES = "/data/local-files/?d="
VERDICTS_FILE = "verdicts.parquet"
VERDICTS_MARKER = b"blip_moderate_verdicts"
VERDICTS_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("text_sha256", pa.string()),
        pa.field("verdict", pa.string()),
        pa.field("annotator", pa.string()),
        pa.field("annotated_at", pa.timestamp("us", tz="UTC")),
        pa.field("task_id", pa.int64()),
        pa.field("annotation_id", pa.int64()),
        pa.field("project_id", pa.int64()),
        pa.field("run_id", pa.string()),
        pa.field("output", pa.string()),
        # --labels: the reviewer's category and checked policies; null where the task asked neither
        pa.field("category", pa.string()),
        pa.field("policies", pa.list_(pa.string())),
    ],
    metadata={VERDICTS_MARKER: b"1"},
)


class ReviewError(ValueError):
    """Unusable output, options or Label Studio export; the message names the problem (exit 2)."""


# ---------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class ExportOptions:
    output: str
    tasks: str
    where: str | None = None
    limit: int | None = None
    image_root: str | None = None


@dataclass
class ExportResult:
    tasks: int
    rows: int  # rows of the output, before --where
    images: dict = field(default_factory=dict)  # how the tasks name their images: s3, local-files, inline, missing
    evidence: int = 0
    tasks_path: str = ""
    config_path: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def config_path_for(tasks: str | Path) -> Path:
    """Where the labeling config goes: beside the tasks file, ``tasks.json`` -> ``tasks.label-config.xml``."""
    tasks = Path(tasks)
    return tasks.with_name(tasks.stem + ".label-config.xml")


def labels_view(policies: list[str] | None) -> str:
    """The category choice and the policy checklist of a ``--labels`` output (``policies``: the
    label file's policy names; None: no labels). The category's options are per task (the row's
    short list, its declared category and "other"): a 10,000-name taxonomy as static choices would
    be a list nobody scrolls."""
    if policies is None:
        return ""
    checklist = "".join(f'        <Choice value="{views.esc(name)}"/>\n' for name in policies)
    view = (
        '      <Header value="Which category is this listing? (the job\'s prediction is preselected)" size="5"/>\n'
        '      <Text name="declared" value="$declared_category"/>\n'
        f'      <Choices name="{CATEGORY_FIELD}" toName="image" choice="single" showInline="true" value="$category_options"/>\n'
    )
    if policies:
        view += (
            '      <Header value="Policies the image breaks (the job\'s hits are preselected)" size="5"/>\n'
            f'      <Choices name="{POLICIES_FIELD}" toName="image" choice="multiple" showInline="true">\n{checklist}'
            "      </Choices>\n"
        )
    return view


def labeling_config(evidence: bool, policies: list[str] | None = None) -> str:
    """The labeling config the tasks need: the image (and evidence), text, caption, scores and the verdict;
    with ``--labels`` outputs (``policies`` not None) the category choice and policy checklist too."""
    evidence_view = (
        '    <Header value="Evidence: where the text lands in the image (Grad-CAM of the ITM score)" size="6"/>\n'
        '    <Image name="evidence" value="$evidence" maxWidth="384px"/>\n'
        '    <Text name="evidence_words" value="$evidence_words"/>\n'
        if evidence else ""
    )
    return (
        "<View>\n"
        '  <View style="display: flex; gap: 16px; flex-wrap: wrap">\n'
        '    <View style="flex: 1; min-width: 320px">\n'
        '      <Image name="image" value="$image" maxWidth="512px"/>\n'
        "    </View>\n"
        '    <View style="flex: 1; min-width: 320px">\n'
        '      <Header value="Text" size="5"/>\n'
        '      <Text name="text" value="$text"/>\n'
        '      <Header value="Caption (BLIP-2: what the image shows)" size="5"/>\n'
        '      <Text name="caption" value="$caption"/>\n'
        '      <Header value="Scores and flag reasons" size="5"/>\n'
        '      <Text name="scores" value="$scores"/>\n'
        '      <Header value="Does the text belong to the image?" size="5"/>\n'
        f'      <Choices name="{VERDICT_FIELD}" toName="image" choice="single" showInline="true" required="true">\n'
        '        <Choice value="match"/>\n'
        '        <Choice value="mismatch"/>\n'
        '        <Choice value="unsure"/>\n'
        "      </Choices>\n"
        f"{labels_view(policies)}"
        "    </View>\n"
        "  </View>\n"
        f"{evidence_view}"
        "</View>\n"
    )


def _config_from(manifest: dict) -> JobConfig:
    values = {k: v for k, v in (manifest.get("config") or {}).items() if k in JobConfig.model_fields}
    try:
        return JobConfig(**values)
    except Exception as exc:  # noqa: BLE001  (a manifest of another version of the job)
        raise ReviewError(f"the output's manifest holds no usable config: {exc}") from None


def _committed(output: str):
    from ..commit.reader import committed_files, read_committed

    try:
        location = locate(output)
        manifest = read_committed(location)
    except (OSError, ValueError) as exc:
        raise ReviewError(f"cannot read {output}: {exc}") from None
    if not manifest:
        raise ReviewError(f"{output} holds no committed jobs.score output (no _SUCCESS and manifest, nor a Delta table "
                          "written by this job)")
    files = committed_files(output)
    if not files:
        raise ReviewError(f"{output} is committed but lists no files")
    dataset = pads.dataset(files, filesystem=location.filesystem, format="parquet")
    return manifest, _config_from(manifest), dataset


def _selected_rows(dataset: pads.Dataset, where, limit: int | None) -> tuple[pa.Table, int]:
    """The rows ``where`` keeps, lowest ITM first (then ITC; unscored rows last), at most ``limit``."""
    keys = [("itm_score", "ascending", "at_end"), ("itc_score", "ascending", "at_end")]
    kept, rows = [], 0
    for batch in dataset.to_batches():
        table = pa.Table.from_batches([batch])
        rows += table.num_rows
        table = table.filter(where(table))
        if limit is not None and table.num_rows > limit:
            table = table.take(pc.sort_indices(table, sort_keys=keys)[:limit])
        if table.num_rows:
            kept.append(table)
    if not kept:
        return dataset.schema.empty_table(), rows
    table = pa.concat_tables(kept, promote_options="permissive")
    table = table.take(pc.sort_indices(table, sort_keys=keys))
    return (table.slice(0, limit) if limit is not None else table), rows


def _placeholder(message: str, size: int = 256) -> str:
    """A grey square saying what is missing, as a PNG data URL (a task's image must be something)."""
    image = Image.new("RGB", (size, size // 2), (224, 224, 224))
    ImageDraw.Draw(image).text((12, size // 4 - 6), message[:40], fill=(60, 60, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_value(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return str(value)


def _local_files_url(path: str, root: str, row_id) -> str:
    absolute, base = os.path.abspath(path), os.path.abspath(root)
    if os.path.commonpath([absolute, base]) != base:
        raise ReviewError(f"image {path!r} of row {row_id!r} is not under --image-root {root}: Label Studio serves "
                          "local files from its document root only")
    return LOCAL_FILES + quote(Path(os.path.relpath(absolute, base)).as_posix())


class _Images:
    """Each row's task image (the rule in the module docstring) and, for evidence, its bytes."""

    def __init__(self, config: JobConfig, table: pa.Table, image_root: str | None):
        self.config, self.root = config, image_root
        self.uri_column = config.image_uri_column if config.image_uri_column in table.column_names else None
        self.ids = table.column(config.id_column).to_pylist() if config.id_column in table.column_names else [None] * table.num_rows
        if image_root and not self.uri_column:
            raise ReviewError("--image-root applies to images named by paths (jobs.score --image-uri-column); this "
                              "output's images are bytes in its input, which tasks embed inline")
        self.uris = table.column(self.uri_column).to_pylist() if self.uri_column else [None] * table.num_rows
        self.modes = [self._mode(uri) for uri in self.uris]
        self._bytes: dict = {}

    def _mode(self, uri) -> str:
        if not self.uri_column:
            return "inline"
        if not uri:
            return "missing"
        if str(uri).startswith("s3://"):
            return "s3"
        return "local-files" if self.root else "inline"

    def load_inline(self, evidence: list) -> None:
        """Read the bytes the inline images and the evidence overlays need, and nothing else."""
        wanted = [i for i, mode in enumerate(self.modes) if mode == "inline" or evidence[i] is not None]
        if not wanted:
            return
        if self.uri_column:
            for i in wanted:
                if self.uris[i]:
                    try:
                        self._bytes[i] = read_bytes(str(self.uris[i]), self.config.max_image_bytes, self.config.http_settings())
                    except (OSError, ValueError):
                        self._bytes[i] = None
            return
        try:
            by_id = fetch_images(self.config, [self.ids[i] for i in wanted])
        except (OSError, ValueError, pa.ArrowInvalid, KeyError):
            by_id = {}  # the input moved or changed: the tasks say so instead of failing the export
        for i in wanted:
            self._bytes[i] = by_id.get(self.ids[i])

    def task_image(self, i: int) -> str:
        mode = self.modes[i]
        if mode == "s3":
            return str(self.uris[i])
        if mode == "local-files":
            return _local_files_url(str(self.uris[i]), self.root, self.ids[i])
        if mode == "missing":
            return _placeholder("no image")
        uri = views.thumbnail_uri(self._bytes.get(i), INLINE_PX)
        if uri is None:
            self.modes[i] = "missing"
            return _placeholder("image not readable")
        return uri

    def evidence(self, i: int, evidence) -> str | None:
        return views.overlay_uri(self._bytes.get(i), evidence, EVIDENCE_PX)


def _scores_line(row: dict) -> str:
    parts = []
    for name, label in (("itm_score", "ITM"), ("itc_score", "ITC"), ("caption_agreement", "caption agreement")):
        if row.get(name) is not None:
            parts.append(f"{label} {row[name]:.3f}")
    reasons = ", ".join(row.get("flag_reasons") or []) or "none"
    status = row.get("status")
    line = " · ".join(parts) if parts else "not scored"
    line += f" · flagged for: {reasons}"
    if status and status != "ok":
        line += f" · {status}: {row.get('error') or ''}".rstrip(": ")
    return line


def _words(evidence) -> str:
    words = (evidence or {}).get("words") or []
    return ", ".join(f"{w['word']} {w['weight']:.2f}" for w in words) or "no words"


def _task(row: dict, config: JobConfig, output: str, image: str, evidence_uri: str | None, with_evidence: bool,
          labels=None) -> dict:
    data = {
        "image": image,
        "text": row.get(config.text_column) or "",
        "caption": row.get("caption") or "",
        "scores": _scores_line(row),
        "row_id": _json_value(row.get(config.id_column)),
        "id_column": config.id_column,
        "run_id": row.get("run_id"),
        "output": output,
        "itm_score": _json_value(row.get("itm_score")),
        "itc_score": _json_value(row.get("itc_score")),
        "caption_agreement": _json_value(row.get("caption_agreement")),
        "flagged": bool(row.get("flagged")),
        "flag_reasons": ", ".join(row.get("flag_reasons") or []),
        "status": row.get("status"),
        "error": row.get("error"),
        "image_sha256": row.get("image_sha256"),
        "text_sha256": row.get("text_sha256"),
    }
    if with_evidence:
        data["evidence"] = evidence_uri or _placeholder("no evidence map")
        data["evidence_words"] = _words(row.get("evidence")) if row.get("evidence") else "no evidence map"
    prediction = {
        "model_version": row.get("itm_model") or config.itm_model,
        "result": [{"from_name": VERDICT_FIELD, "to_name": "image", "type": "choices",
                    "value": {"choices": ["mismatch" if row.get("flagged") else "match"]}}],
    }
    if row.get("itm_score") is not None:
        prediction["score"] = _json_value(row["itm_score"])
    if labels is not None:
        _add_labels(data, prediction, row, labels)
    return {"data": data, "predictions": [prediction]}


def _add_labels(data: dict, prediction: dict, row: dict, labels) -> None:
    """A ``--labels`` task's category options and prefilled choices (``labels``: the output's ``LabelSet``)."""
    declared = row.get(labels.column) if labels.column else None
    index = labels.declared_index(declared)
    options = [item["name"] for item in row.get("labels") or [] if item["kind"] == "category"]
    if index is not None and index >= 0:
        options.append(labels.names[index])
    options = list(dict.fromkeys(options + [OTHER_CATEGORY]))
    data["declared_category"] = f"declared: {declared}" if declared is not None else "declared: none"
    data["category_options"] = [{"value": name} for name in options]
    data["policy_names"] = [p["name"] for p in labels.policies]
    if row.get("category_predicted") is not None:
        prediction["result"].append({"from_name": CATEGORY_FIELD, "to_name": "image", "type": "choices",
                                     "value": {"choices": [row["category_predicted"]]}})
    hits = [reason[len("policy:"):] for reason in row.get("flag_reasons") or [] if reason.startswith("policy:")]
    if hits:
        prediction["result"].append({"from_name": POLICIES_FIELD, "to_name": "image", "type": "choices",
                                     "value": {"choices": hits}})


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def export_tasks(options: ExportOptions) -> ExportResult:
    """Write the tasks file and its labeling config; raises ``ReviewError`` for unusable input."""
    if options.limit is not None and options.limit < 1:
        raise ReviewError("--limit must be at least 1")
    if options.image_root and options.image_root.startswith(("s3://", "http://", "https://")):
        raise ReviewError("--image-root is Label Studio's local-files document root, a local directory; s3:// images "
                          "need no root (a Label Studio S3 storage serves them)")
    manifest, config, dataset = _committed(options.output)
    try:
        where = parse(options.where if options.where is not None else DEFAULT_WHERE, dataset.schema)
    except WhereError as exc:
        raise ReviewError(str(exc)) from None
    table, rows = _selected_rows(dataset, where, options.limit)
    images = _Images(config, table, options.image_root)
    inline = sum(mode == "inline" for mode in images.modes)
    if inline > INLINE_MAX_TASKS:
        raise ReviewError(f"{inline} tasks would embed their images inline (at most {INLINE_MAX_TASKS}): pass --limit, "
                          "or score with --image-uri-column and pass --image-root (or keep images on S3)")
    evidence = table.column("evidence").to_pylist() if "evidence" in table.column_names else [None] * table.num_rows
    images.load_inline(evidence)
    with_evidence = any(e is not None for e in evidence)
    labels = None
    if config.labels is not None and "labels" in table.column_names:
        from ..labels import LabelSet

        labels = LabelSet(config.labels)
    tasks = []
    for i, row in enumerate(table.to_pylist()):
        overlay = images.evidence(i, evidence[i]) if evidence[i] is not None else None
        tasks.append(_task(row, config, options.output, images.task_image(i), overlay, with_evidence, labels))
    tasks_path = Path(options.tasks)
    config_path = config_path_for(tasks_path)
    policies = None if labels is None else [p["name"] for p in labels.policies]
    _write_atomically(config_path, labeling_config(with_evidence, policies))
    _write_atomically(tasks_path, json.dumps(tasks, ensure_ascii=False))
    counts: dict = {}
    for mode in images.modes:
        counts[mode] = counts.get(mode, 0) + 1
    return ExportResult(tasks=len(tasks), rows=rows, images=counts,
                        evidence=sum(e is not None for e in evidence), tasks_path=str(tasks_path),
                        config_path=str(config_path))


# ---------------------------------------------------------------------------------------------
# import


@dataclass
class ImportResult:
    tasks: int
    verdicts: int  # tasks of this export with a verdict
    unannotated: int
    table_rows: int  # rows of the verdicts table after the merge
    replaced: int  # tasks whose earlier verdict this import replaced with a newer one
    by_verdict: dict = field(default_factory=dict)
    path: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _time(value) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _annotator(value) -> str | None:
    if isinstance(value, dict):  # some exports expand the user
        value = value.get("email") or value.get("id")
    return None if value is None else str(value)


def _verdict_of(annotation: dict, task_id) -> str | None:
    for item in annotation.get("result") or []:
        if item.get("from_name") != VERDICT_FIELD or item.get("type") != "choices":
            continue
        choices = (item.get("value") or {}).get("choices") or []
        if len(choices) != 1 or choices[0] not in VERDICTS:
            raise ReviewError(f"task {task_id}: verdict {choices!r} is not one of {', '.join(VERDICTS)}")
        return choices[0]
    return None


def _choices_of(annotation: dict, name: str) -> list[str] | None:
    for item in annotation.get("result") or []:
        if item.get("from_name") == name and item.get("type") == "choices":
            return list((item.get("value") or {}).get("choices") or [])
    return None


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_export(path: str) -> tuple[list[dict], int]:
    """The latest verdict of each annotated task of a Label Studio JSON export, and the number of tasks."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReviewError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ReviewError(f"{path} is not JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise ReviewError(f"{path} is not a Label Studio JSON export (a list of tasks); export the project as JSON")
    rows = []
    for position, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict) or _int(task.get("id")) is None:
            raise ReviewError(f"{path}: item {position} is not a Label Studio task (no id and data); export as JSON, "
                              "not JSON_MIN or CSV")
        data, task_id = task["data"], task["id"]
        if data.get("row_id") is None:
            raise ReviewError(f"{path}: task {task_id} has no data.row_id: its tasks were not written by jobs.review export")
        best = None
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            verdict = _verdict_of(annotation, task_id)
            if verdict is None:
                continue
            when = _time(annotation.get("updated_at")) or _time(annotation.get("created_at"))
            key = (when or datetime.min.replace(tzinfo=timezone.utc), _int(annotation.get("id")) or 0)
            if best is None or key >= best[0]:
                best = (key, annotation, verdict, when)
        if best is None:
            continue
        _, annotation, verdict, when = best
        rows.append({
            "row_id": str(data["row_id"]),
            "image_sha256": data.get("image_sha256"),
            "text_sha256": data.get("text_sha256"),
            "verdict": verdict,
            "annotator": _annotator(annotation.get("completed_by")),
            "annotated_at": when,
            "task_id": task_id,
            "annotation_id": _int(annotation.get("id")),
            "project_id": _int(task.get("project")),
            "run_id": data.get("run_id"),
            "output": data.get("output"),
            **_label_verdicts(annotation, data),
        })
    return rows, len(tasks)


def _label_verdicts(annotation: dict, data: dict) -> dict:
    """The reviewer's category and policies of a ``--labels`` task (it has ``policy_names``); an
    unchecked checklist leaves no result in Label Studio's export, so it reads as no policy."""
    if "policy_names" not in data:
        return {"category": None, "policies": None}
    category = _choices_of(annotation, CATEGORY_FIELD)
    policies = _choices_of(annotation, POLICIES_FIELD)
    return {"category": category[0] if category else None, "policies": policies or []}


def verdicts_path(verdicts: str) -> str:
    """The verdicts table's file: ``verdicts/`` -> ``verdicts/verdicts.parquet`` (a ``.parquet`` path as it is)."""
    return verdicts if verdicts.endswith(".parquet") else posixpath.join(verdicts.rstrip("/"), VERDICTS_FILE)


def is_verdicts_table(path: str) -> bool:
    """Whether ``path`` (a file or the directory holding it) is a verdicts table this module wrote."""
    location = locate(verdicts_path(path))
    try:
        schema = pq.read_schema(location.path, filesystem=location.filesystem)
    except (OSError, pa.ArrowInvalid):
        return False
    return VERDICTS_MARKER in (schema.metadata or {})


def read_verdicts(path: str) -> pa.Table:
    location = locate(verdicts_path(path))
    table = pq.read_table(location.path, filesystem=location.filesystem)
    for field_ in VERDICTS_SCHEMA:  # a table written before --labels lacks their columns
        if field_.name not in table.column_names:
            table = table.append_column(field_.name, pa.nulls(table.num_rows, field_.type))
    return table.select(VERDICTS_SCHEMA.names).cast(VERDICTS_SCHEMA)


def _latest_per_task(table: pa.Table) -> pa.Table:
    """One row per task: the latest ``annotated_at``; on a tie, the row that comes later (this import)."""
    order = pc.sort_indices(table, sort_keys=[("task_id", "ascending", "at_start"), ("annotated_at", "ascending", "at_start")])
    ordered = table.take(order)
    tasks = ordered.column("task_id").to_pylist()
    last = [i for i in range(len(tasks)) if i + 1 == len(tasks) or tasks[i + 1] != tasks[i]]
    return ordered.take(pa.array(last, pa.int64()))


def import_verdicts(annotations: str, verdicts: str) -> ImportResult:
    """Merge a Label Studio JSON export into the verdicts table at ``verdicts`` (created when absent)."""
    rows, task_count = read_export(annotations)
    new = pa.Table.from_pylist(rows, schema=VERDICTS_SCHEMA)
    target = verdicts_path(verdicts)
    location = locate(target)
    exists = location.filesystem.get_file_info(location.path).type != pafs.FileType.NotFound
    if exists and not is_verdicts_table(target):
        raise ReviewError(f"{target} exists and is not a verdicts table written by jobs.review import")
    old = read_verdicts(target) if exists else VERDICTS_SCHEMA.empty_table()
    before_time = dict(zip(old.column("task_id").to_pylist(), old.column("annotated_at").to_pylist()))
    merged = _latest_per_task(pa.concat_tables([old, new]))
    replaced = sum(
        1 for task, when in zip(merged.column("task_id").to_pylist(), merged.column("annotated_at").to_pylist())
        if task in before_time and when != before_time[task]
    )
    directory = posixpath.dirname(location.path)
    if directory:
        location.filesystem.create_dir(directory, recursive=True)
    temporary = posixpath.join(directory, f"_{posixpath.basename(location.path)}.{uuid.uuid4().hex}.tmp")
    pq.write_table(merged.replace_schema_metadata(VERDICTS_SCHEMA.metadata), temporary, filesystem=location.filesystem)
    location.filesystem.move(temporary, location.path)  # a rename: readers see the old table or the new one
    counts: dict = {}
    for verdict in new.column("verdict").to_pylist():
        counts[verdict] = counts.get(verdict, 0) + 1
    return ImportResult(tasks=task_count, verdicts=new.num_rows, unannotated=task_count - new.num_rows,
                        table_rows=merged.num_rows, replaced=replaced, by_verdict=counts, path=target)
