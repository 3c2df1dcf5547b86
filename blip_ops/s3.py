"""S3 through pyarrow: one filesystem per process, configured from the standard AWS environment.

Credentials are never passed or stored here: the AWS SDK inside pyarrow reads them itself
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``~/.aws``, instance
metadata), so they cannot end up in a config, a manifest, a pickled task or a log line.
Only the endpoint override (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) is read here.
"""

from __future__ import annotations

import functools
import os
import time

import pyarrow.fs as pafs

# The SDK's "standard" mode: exponential backoff with jitter on throttling (503 SlowDown) and
# server errors (500 InternalError), with a retry quota that stops retry storms against a store
# that is really down. Ten attempts (Ray Data retries its Parquet writes as often) ride out
# bursts of throttling that the SDK's default of three does not.
MAX_ATTEMPTS = 10


def split_uri(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (pyarrow's path form)."""
    return uri[len("s3://"):].rstrip("/")


def _endpoint_settings() -> tuple[tuple[str, str], ...]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return ()
    scheme, _, host = endpoint.partition("://")
    if not host:
        scheme, host = "https", endpoint
    return (("endpoint_override", host.rstrip("/")), ("scheme", scheme))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, rebuilt by ``filesystem()`` wherever it is unpickled.

    pyarrow's own pickling drops the retry strategy, so a filesystem shipped to Ray workers
    would silently fall back to three attempts. This one carries only its (secret-free)
    endpoint settings and is rebuilt with the same strategy on arrival; credentials come from
    the receiving worker's own AWS environment, as with pyarrow's default.
    """

    def __reduce__(self):
        return (_rebuild, (getattr(self, "_settings", ()),))


def _rebuild(settings: tuple[tuple[str, str], ...]) -> RetryingS3FileSystem:
    return _cached(settings)


@functools.lru_cache(maxsize=8)
def _cached(settings: tuple[tuple[str, str], ...]) -> RetryingS3FileSystem:
    fs = RetryingS3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS), **dict(settings)
    )
    fs._settings = settings
    return fs


def filesystem() -> RetryingS3FileSystem:
    """This process's S3 filesystem (building one costs credential and region look-ups, so it is
    shared by every call with the same endpoint settings)."""
    return _cached(_endpoint_settings())


# The AWS SDK writes an error response's body into the reader's buffer, which for a small ranged
# read (a Parquet footer) is smaller than the XML of a 500 or 503: the write fails, the status is
# lost, and the SDK reports a non-retryable INTERNAL_FAILURE "Failed to flush response stream"
# instead of retrying the throttling or server error it met (apache/doris #66557, milvus #49872
# retry the same message). Seen here against the fault-injecting test store on the driver's reads.
FLUSH_FAILURE = "Failed to flush response stream"
READ_ATTEMPTS = 5


def retry_flush_failures(read, attempts: int = READ_ATTEMPTS):
    """``read()``, again (with a short backoff) while it fails with the SDK's flush failure; ``read``
    must be safe to repeat (a whole read from the start, not a stream half consumed)."""
    for attempt in range(attempts):
        try:
            return read()
        except OSError as exc:
            if FLUSH_FAILURE not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
