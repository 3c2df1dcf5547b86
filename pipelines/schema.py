"""The output contract: added columns, their types and order."""

from __future__ import annotations

import pyarrow as pa

# 2: caption_agreement, text_language, evidence, image_sha256, text_sha256, scores_from_run, caption_from_run.
# 3: category_predicted, category_score, category_rank, labels (pipelines.labels). The optional columns
#    (extra_fields: image_embedding, text_embedding, image_group, image_group_size) came in the same round
#    and are present only when asked for, so they need no bump of their own.
SCHEMA_VERSION = 3

STATUS_OK = "ok"
STATUS_IMAGE_ERROR = "image_error"
STATUS_TEXT_ERROR = "text_error"

REASON_ITM = "itm_below_threshold"
REASON_ITC = "itc_below_threshold"
REASON_CAPTION = "caption_disagrees"
REASON_LANGUAGE = "text_language_unsupported"

# Label flags (pipelines.labels): a policy's reason is POLICY_PREFIX + its name.
REASON_CATEGORY_MISMATCH = "category_mismatch"
REASON_CATEGORY_UNKNOWN = "category_unknown"
POLICY_PREFIX = "policy:"

CAPTION_AGREEMENT = "caption_agreement"
TEXT_LANGUAGE = "text_language"

# Grad-CAM of the ITM score (blip_ops.evidence): raw map over the patch grid (row-major), the
# text's heaviest words, the explained layer; null where not computed.
EVIDENCE_TYPE = pa.struct([
    pa.field("rows", pa.int16()),
    pa.field("cols", pa.int16()),
    pa.field("heat", pa.list_(pa.float32())),
    pa.field("words", pa.list_(pa.struct([pa.field("word", pa.string()), pa.field("weight", pa.float32())]))),
    pa.field("layer", pa.int8()),
])

# Every category candidate and every policy of a row, by ITM descending (blip_ops.labels).
LABELS_TYPE = pa.list_(pa.struct([
    pa.field("name", pa.string()),
    pa.field("kind", pa.string()),  # "category" or "policy"
    pa.field("itc", pa.float32()),
    pa.field("itm", pa.float32()),
]))
LABEL_FIELDS = [
    pa.field("category_predicted", pa.string()),
    pa.field("category_score", pa.float32()),
    pa.field("category_rank", pa.int32()),
    pa.field("labels", LABELS_TYPE),
]
LABEL_COLUMNS = [field.name for field in LABEL_FIELDS]

OUTPUT_FIELDS = [
    pa.field("itc_score", pa.float32()),
    pa.field("itm_score", pa.float32()),
    pa.field("caption", pa.string()),
    pa.field(CAPTION_AGREEMENT, pa.float32()),
    pa.field("flagged", pa.bool_()),
    pa.field("flag_reasons", pa.list_(pa.string())),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("text_truncated", pa.bool_()),
    pa.field(TEXT_LANGUAGE, pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC")),
    pa.field("itm_model", pa.string()),
    pa.field("caption_model", pa.string()),
    pa.field("evidence", EVIDENCE_TYPE),
    *LABEL_FIELDS,  # null without --labels
    # Content keys (pipelines.keys) and where the numbers come from (the run that computed them).
    pa.field("image_sha256", pa.string()),
    pa.field("text_sha256", pa.string()),
    pa.field("scores_from_run", pa.string()),
    pa.field("caption_from_run", pa.string()),
]
OUTPUT_COLUMNS = [field.name for field in OUTPUT_FIELDS]

# Working columns that travel between stages and never reach the output.
IMAGE_ERROR = "__image_error"
TEXT_ERROR = "__text_error"
PIXELS_SCORE = "__pixels_score"
PIXELS_CAPTION = "__pixels_caption"
# --decode-device gpu: a JPEG row's bytes for each model stage (decoded in its actor), and its EXIF orientation.
JPEG_SCORE = "__jpeg_score"
JPEG_CAPTION = "__jpeg_caption"
JPEG_ORIENTATION = "__jpeg_orientation"
# Seconds of evidence computation, spread over the rows it explained (summed for the manifest).
EVIDENCE_SECONDS = "__evidence_s"


# --embeddings (pipelines.vectors): the normalised ITC projections, D = the checkpoint's
# image_text_hidden_size (256 for BLIP-base); null where not scored. Present only when asked for.
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
# --near-duplicates (pipelines.dataflow.neardup): the smallest image_sha256 of the row's group, and
# the rows of the run whose image is in that group. Present only when asked for.
IMAGE_GROUP = "image_group"
IMAGE_GROUP_SIZE = "image_group_size"
# The keyed plan carries a row's projections as raw float16 bytes (a fixed schema, whatever D is).
IMAGE_EMBEDDING_BYTES = "__image_embedding"
TEXT_EMBEDDING_BYTES = "__text_embedding"


def embedding_type(dim: int, element: pa.DataType = pa.float16()) -> pa.DataType:
    """A true Arrow fixed-size list (what DuckDB, Lance and Polars read), not Ray's tensor extension type.
    float16, except in a Delta table, whose protocol has no half float (there: float32, which a Delta
    reader sees as ``array<float>``, Delta having no fixed-size array either)."""
    return pa.list_(element, dim)


def extra_fields(
    embeddings: str = "none", dim: int | None = None, near_duplicates: bool = False, element: pa.DataType = pa.float16()
) -> list[pa.Field]:
    """The optional columns after ``OUTPUT_FIELDS``, in order: embeddings (``image`` or ``both``), then groups."""
    fields = []
    if embeddings in ("image", "both"):
        fields.append(pa.field(IMAGE_EMBEDDING, embedding_type(dim, element)))
    if embeddings == "both":
        fields.append(pa.field(TEXT_EMBEDDING, embedding_type(dim, element)))
    if near_duplicates:
        fields += [pa.field(IMAGE_GROUP, pa.string()), pa.field(IMAGE_GROUP_SIZE, pa.int32())]
    return fields


def passthrough_schema(input_schema: pa.Schema, image_column: str | None) -> pa.Schema:
    return pa.schema([field for field in input_schema if field.name != image_column])


def output_schema(input_schema: pa.Schema, image_column: str | None, extra=()) -> pa.Schema:
    """``extra``: ``extra_fields(...)`` for the optional columns this run writes."""
    passthrough = passthrough_schema(input_schema, image_column)
    return pa.schema(list(passthrough) + OUTPUT_FIELDS + list(extra), metadata={b"blip_moderate_schema_version": str(SCHEMA_VERSION).encode()})
