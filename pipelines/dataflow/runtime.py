"""Connecting to Ray (reuse a running session, start a local one, or join a cluster), and
how a long run shows its progress.

Progress: on a terminal, Ray Data's own progress bars. Anywhere else (a log file, a Kubernetes
pod, ``ray job submit``'s captured output, a notebook), one line every
``BLIP_MODERATE_PROGRESS_INTERVAL_S`` seconds (default 15) on stderr::

    progress: 1200/5000 rows scored (24%), 35.2 rows/s, about 1m48s left

instead of Ray's multi-line operator dumps, then a closing line; the job's summary follows.

Stalls: when no row has been scored for ``BLIP_MODERATE_STALL_WARNING_S`` seconds (default 300;
0 turns it off) while the scoring actors are idle or not yet started, the line says so and
names the likely cause (on a terminal, a warning line beside Ray's bars). Ray's own answer is
to fail after 30 minutes without progress; a starving plan shows ``0 rows scored`` until then.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import ray

PROGRESS_INTERVAL_ENV = "BLIP_MODERATE_PROGRESS_INTERVAL_S"
DEFAULT_PROGRESS_INTERVAL_S = 15.0
# The operator whose output rows count as "done": every row passes through scoring once.
PROGRESS_OPERATOR = "ScoreStage"
STALL_WARNING_ENV = "BLIP_MODERATE_STALL_WARNING_S"
DEFAULT_STALL_WARNING_S = 300.0

progress_log = logging.getLogger("blip_moderate.progress")

# None: decide by whether stdout is a terminal (as Ray does); True/False force it.
_interactive: bool | None = None
# Rows the next run will score, when the caller knows (Ray's plan often does not).
_expected_rows: int | None = None


def expect_rows(rows: int | None) -> None:
    """Tell the progress lines how many rows the next dataset run scores (for % and time left)."""
    global _expected_rows
    _expected_rows = rows


class _DropTokenAuthEnabledNotice(logging.Filter):
    """A new local Ray turns token authentication on by default and says so at WARNING level on
    every start: nothing to act on, so it stays off the terminal. Ray's warning that
    authentication is *disabled* still shows. (Setting ``RAY_AUTH_MODE=token`` once Ray is
    imported is too late: Ray reads it at import, and the local Ray then fails to start.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled")


def _quiet_token_auth_notice() -> None:
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthEnabledNotice) for f in auth_log.filters):
        auth_log.addFilter(_DropTokenAuthEnabledNotice())


def learn_fsspec_errors() -> list[str]:
    """Ray Data retries reads and writes whose error names one of ``DataContext.retried_io_errors``,
    which lists the AWS SDK's messages only (pyarrow's native S3): add the fsspec clients' transient
    errors (``blip_ops.stores.FSSPEC_TRANSIENT``: s3fs, gcsfs, adlfs, HTTP), once per process."""
    from blip_ops.stores import FSSPEC_TRANSIENT

    context = ray.data.DataContext.get_current()
    current = list(context.retried_io_errors)
    context.retried_io_errors = current + [m for m in FSSPEC_TRANSIENT if m not in current]
    return context.retried_io_errors


def connect(address: str | None) -> bool:
    """Returns True when this call started Ray (and so should shut it down)."""
    configure_progress()
    learn_fsspec_errors()
    if ray.is_initialized():
        return False
    _quiet_token_auth_notice()
    from blip_ops.stores import BACKEND_ENV

    ray.init(
        address=address,
        include_dashboard=False,
        # A cluster's workers get a non-default storage backend through the job's runtime env (a local
        # Ray's inherit this environment; any runtime env there would cost its prestarted workers).
        runtime_env={"env_vars": {BACKEND_ENV: os.environ[BACKEND_ENV]}}
        if address and os.environ.get(BACKEND_ENV, "native") != "native" else None,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    return True


def map_tasks(fn, items: list, *, num_cpus: float = 1.0, max_retries: int = 2):
    """``fn(item)`` for every item, each in its own Ray task (never on the driver), yielded as they
    finish, on the Ray this process is connected to (the caller's choice: a run without Ray uses
    ``local.map_processes``). Tasks still running when the caller stops are cancelled."""
    if not items:
        return
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    pending = [remote.remote(item) for item in items]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


# ---------------------------------------------------------------------------------------------
# progress


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _progress_logger() -> logging.Logger:
    # Its own handler: the CLI configures no logging, and INFO lines must still show.
    if not progress_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        progress_log.addHandler(handler)
        progress_log.setLevel(logging.INFO)
        progress_log.propagate = False
    return progress_log


def progress_interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL_S)))
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL_S


def stall_warning_s() -> float:
    try:
        return max(0.0, float(os.environ.get(STALL_WARNING_ENV, DEFAULT_STALL_WARNING_S)))
    except ValueError:
        return DEFAULT_STALL_WARNING_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(done: int, total: int | None, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        left = f", about {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        return f"progress: {done}/{total} rows scored ({100 * done / total:.0f}%), {rate:.1f} rows/s{left}"
    return f"progress: {done} rows scored, {rate:.1f} rows/s"


def _score_state(topology):
    for state in topology.values():
        if PROGRESS_OPERATOR in state.op.name:
            return state
    return None


def stall_cause(running: int, pending: int, active: int, stalled_s: float) -> str | None:
    """What a stall of ``stalled_s`` seconds means, from the scoring pool's actor counts; None
    while an actor is busy (a long batch is not a stall)."""
    if active > 0:
        return None
    if running == 0 and pending > 0:
        why = (
            f"the {pending} scoring actor{'s' * (pending != 1)} never started: the cluster has no free CPUs or "
            "GPUs for them (lower --score-cpus, --score-gpus or --score-actors MIN)"
        )
    else:
        why = (
            f"the {running} scoring actor{'s' * (running != 1)} sit{'s' * (running == 1)} idle waiting for input: "
            "the read and decode tasks are not running, most likely because the model actors hold every CPU "
            "(lower --score-cpus or --score-actors MIN), or reading the input is stuck"
        )
    return f"no row scored for {_duration(stalled_s)}; {why}"


class StallWatch:
    """Notices when the scored-row count stops moving while the scoring actors do nothing."""

    def __init__(self, limit_s: float | None = None):
        self.limit_s = stall_warning_s() if limit_s is None else limit_s
        self._done = -1
        self._moved = time.monotonic()

    def check(self, topology, done: int, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if done != self._done:
            self._done, self._moved = done, now
            return None
        stalled = now - self._moved
        if not self.limit_s or stalled < self.limit_s:
            return None
        state = _score_state(topology)
        if state is None:
            return None
        try:
            info = state.op.get_actor_info()
        except (AttributeError, NotImplementedError):  # not an actor pool (a Ray internal, pinned 2.60.x)
            return None
        return stall_cause(info.running, info.pending, info.active, stalled)


def _line_manager_class():
    """A Ray Data progress manager (Ray 2.60's non-terminal one) that logs one compact line."""
    from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager

    class LineProgressManager(LoggingExecutionProgressManager):
        LOG_REPORT_INTERVAL_SEC = 0  # we keep our own clock

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._started = time.monotonic()
            self._last = self._started
            self._interval = progress_interval_s()
            self._stall = StallWatch()

        def _rows(self) -> tuple[int, int | None]:
            state = _score_state(self._topology)
            if state is not None:
                return int(state.op.metrics.row_outputs_taken), _expected_rows or state.op.num_output_rows_total()
            metric = self._global_progress_metric
            return int(metric.completed), _expected_rows or metric.total

        def refresh(self):
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            done, total = self._rows()
            stalled = self._stall.check(self._topology, done, now)
            line = progress_line(done, total, now - self._started)
            if stalled:
                _progress_logger().warning(f"{line}; {stalled}")
            else:
                _progress_logger().info(line)

        def close_with_finishing_description(self, desc: str, success: bool):
            done, total = self._rows()
            elapsed = time.monotonic() - self._started
            verdict = "done" if success else "stopped"
            _progress_logger().info(f"{verdict}: {done} rows scored in {_duration(elapsed)} ({done / max(elapsed, 1e-9):.1f} rows/s)")

    return LineProgressManager


def _watched(manager, topology):
    """Ray's own progress manager (bars on a terminal), plus a warning line when rows stall."""
    refresh = getattr(manager, "refresh", None)
    if refresh is None:
        return manager
    watch = StallWatch()
    warned = [0.0]

    def refresh_and_watch(*args, **kwargs):
        result = refresh(*args, **kwargs)
        state = _score_state(topology)
        now = time.monotonic()
        stalled = watch.check(topology, int(state.op.metrics.row_outputs_taken), now) if state is not None else None
        if stalled and now - warned[0] >= progress_interval_s():
            warned[0] = now
            _progress_logger().warning(f"warning: {stalled}")
        return result

    manager.refresh = refresh_and_watch
    return manager


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (execution plans, "Starting execution", "finished in") stay in its log
    file (``logs/ray-data/`` of the Ray session); the terminal keeps its warnings and our progress."""
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(max(handler.level, logging.WARNING))


def configure_progress(interactive: bool | None = None) -> bool:
    """Progress bars on a terminal, log lines elsewhere; ``interactive`` overrides the terminal check.

    Returns whether the line logger is installed. It replaces the factory Ray Data's streaming
    executor calls (a Ray 2.60 internal; Ray is pinned to 2.60.x): where that is not found,
    Ray's own behaviour stays, which is progress bars or its own log blocks.
    """
    import ray.data

    global _interactive
    _interactive = interactive
    ray.data.DataContext.get_current().enable_progress_bars = True
    quiet_ray_data_console()
    try:
        from ray.data._internal.execution import streaming_executor

        line_manager = _line_manager_class()
    except (ImportError, AttributeError):
        return False
    original = getattr(streaming_executor.get_progress_manager, "_blip_original", streaming_executor.get_progress_manager)

    def get_progress_manager(ctx, dataset_id, topology, verbose_progress):
        terminal = sys.stdout.isatty() if _interactive is None else _interactive
        if terminal or not ctx.enable_progress_bars:
            return _watched(original(ctx, dataset_id, topology, verbose_progress), topology)
        return line_manager(dataset_id, topology, ctx.enable_operator_progress_bars, verbose_progress)

    get_progress_manager._blip_original = original
    streaming_executor.get_progress_manager = get_progress_manager
    return True
