"""The output contract: added columns, their types and order."""

from __future__ import annotations

import pyarrow as pa

# 2: caption_agreement, text_language, evidence, image_sha256, text_sha256, scores_from_run, caption_from_run.
# 3: category_predicted, category_score, category_rank, labels (pipelines.labels).
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


def passthrough_schema(input_schema: pa.Schema, image_column: str | None) -> pa.Schema:
    return pa.schema([field for field in input_schema if field.name != image_column])


def output_schema(input_schema: pa.Schema, image_column: str | None) -> pa.Schema:
    passthrough = passthrough_schema(input_schema, image_column)
    return pa.schema(list(passthrough) + OUTPUT_FIELDS, metadata={b"blip_moderate_schema_version": str(SCHEMA_VERSION).encode()})
