"""Progress output: one compact line per interval when not on a terminal, Ray's bars on one."""

import re

import pytest

from pipelines.dataflow import runtime


def _run(ray, rows=60):
    import ray.data

    class ScoreStage:
        """Named like the pipeline's scoring stage, whose output rows count as done (defined
        here so it is pickled by value: Ray's workers cannot import test modules)."""

        def __call__(self, batch):
            return batch

    ds = ray.data.range(rows, override_num_blocks=3).map_batches(
        ScoreStage, batch_size=10, compute=ray.data.ActorPoolStrategy(size=1)
    )
    return ds.count()


@pytest.fixture
def every_refresh(monkeypatch):
    monkeypatch.setenv(runtime.PROGRESS_INTERVAL_ENV, "0")
    yield
    runtime.configure_progress(None)


def test_log_lines_when_not_a_terminal(ray_session, every_refresh, capsys):
    assert runtime.configure_progress(interactive=False)
    runtime.expect_rows(60)
    try:
        assert _run(ray_session) == 60
    finally:
        runtime.expect_rows(None)
    err = capsys.readouterr().err
    lines = re.findall(r"progress: (\d+)/(\d+) rows scored \(\d+%\), [\d.]+ rows/s", err)
    assert lines, err[-2000:]
    assert all(int(total) == 60 and 0 <= int(done) <= 60 for done, total in lines)
    assert re.search(r"done: 60 rows scored in \d+s \([\d.]+ rows/s\)", err), err[-2000:]
    assert "Running Dataset" not in err  # Ray's multi-line blocks are replaced


def test_terminal_keeps_rays_progress_bars(every_refresh):
    import ray.data
    from ray.data._internal.execution import streaming_executor

    context = ray.data.DataContext.get_current()
    runtime.configure_progress(interactive=True)
    ray_default = streaming_executor.get_progress_manager(context, "ds", {}, False)
    runtime.configure_progress(interactive=False)
    ours = streaming_executor.get_progress_manager(context, "ds", {}, False)
    assert type(ours).__name__ == "LineProgressManager" and type(ray_default).__name__ != "LineProgressManager"
    # Installing twice wraps Ray's own factory once, not our wrapper.
    original = streaming_executor.get_progress_manager._blip_original
    assert original.__module__ == "ray.data._internal.progress"


def test_progress_line_and_interval(monkeypatch):
    assert runtime.progress_line(1200, 5000, 34.09) == "progress: 1200/5000 rows scored (24%), 35.2 rows/s, about 1m48s left"
    assert runtime.progress_line(5000, 5000, 100) == "progress: 5000/5000 rows scored (100%), 50.0 rows/s"
    assert runtime.progress_line(7, None, 2) == "progress: 7 rows scored, 3.5 rows/s"
    assert runtime.progress_line(0, 10, 0) == "progress: 0/10 rows scored (0%), 0.0 rows/s"
    monkeypatch.setenv(runtime.PROGRESS_INTERVAL_ENV, "2.5")
    assert runtime.progress_interval_s() == 2.5
    monkeypatch.setenv(runtime.PROGRESS_INTERVAL_ENV, "soon")
    assert runtime.progress_interval_s() == runtime.DEFAULT_PROGRESS_INTERVAL_S
    monkeypatch.delenv(runtime.PROGRESS_INTERVAL_ENV)
    assert runtime.progress_interval_s() == runtime.DEFAULT_PROGRESS_INTERVAL_S


def test_a_stall_is_named_in_the_progress_line_while_the_actors_sit_idle(ray_session, every_refresh, monkeypatch, capsys,
                                                                        tmp_path):
    """A read stage that blocks starves the scoring actor: the line says so, not just '0 rows'.

    The read blocks until the driver has logged the stall (a file marks it), not for a fixed time:
    on a busy machine the actor alone may take longer than any fixed sleep to start. The bound
    (300 s) is only there so that a broken stall warning fails the test instead of hanging it."""
    import logging
    import os
    import time as _time

    import ray.data

    monkeypatch.setenv(runtime.STALL_WARNING_ENV, "1")
    marker = str(tmp_path / "stall-logged")

    class MarkStall(logging.Handler):
        def emit(self, record):
            if "sits idle" in record.getMessage():
                open(marker, "w").close()

    handler = MarkStall()
    runtime._progress_logger()  # its stderr handler first (it is added only to a logger without one)
    runtime.progress_log.addHandler(handler)

    def blocked_read(batch):
        deadline = _time.monotonic() + 300
        while not os.path.exists(marker) and _time.monotonic() < deadline:  # read/decode tasks that never get a CPU
            _time.sleep(0.05)
        return batch

    class ScoreStage:
        def __call__(self, batch):
            return batch

    assert runtime.configure_progress(interactive=False)
    # A remote-args function keeps Ray from fusing the read into the actor, as in the pipeline.
    ds = ray.data.range(20, override_num_blocks=1).map_batches(blocked_read, batch_size=None, ray_remote_args_fn=dict)
    ds = ds.map_batches(
        ScoreStage, batch_size=10, compute=ray.data.ActorPoolStrategy(size=1)
    )
    try:
        assert ds.count() == 20
    finally:
        runtime.progress_log.removeHandler(handler)
    err = capsys.readouterr().err
    assert re.search(r"progress: 0 rows scored.*; no row scored for \d+s; the 1 scoring actor sits idle waiting for input", err), err[-3000:]
    assert "lower --score-cpus or --score-actors MIN" in err


class _Info:
    def __init__(self, running, pending, active):
        self.running, self.pending, self.active = running, pending, active


class _Op:
    name = "MapBatches(ScoreStage)"

    def __init__(self, info):
        self.info = info

    def get_actor_info(self):
        return self.info


class _State:
    def __init__(self, info):
        self.op = _Op(info)


def test_stall_watch_waits_for_the_limit_and_stays_quiet_while_an_actor_works():
    idle = {"score": _State(_Info(running=2, pending=0, active=0))}
    watch = runtime.StallWatch(limit_s=120)
    assert watch.check(idle, 0, now=0) is None
    assert watch.check(idle, 0, now=119) is None
    assert watch.check(idle, 0, now=121).startswith("no row scored for 2m01s; the 2 scoring actors sit idle")
    assert watch.check(idle, 5, now=200) is None  # rows moved: the clock restarts
    busy = {"score": _State(_Info(running=1, pending=0, active=1))}
    assert watch.check(busy, 5, now=1000) is None  # a long batch is not a stall
    pending = {"score": _State(_Info(running=0, pending=1, active=0))}
    assert "the 1 scoring actor never started" in watch.check(pending, 5, now=1000)
    assert runtime.StallWatch(limit_s=0).check(idle, 0, now=10**6) is None  # 0 turns it off


def test_stall_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv(runtime.STALL_WARNING_ENV, "42")
    assert runtime.stall_warning_s() == 42
    monkeypatch.setenv(runtime.STALL_WARNING_ENV, "later")
    assert runtime.stall_warning_s() == runtime.DEFAULT_STALL_WARNING_S
    monkeypatch.delenv(runtime.STALL_WARNING_ENV)
    assert runtime.stall_warning_s() == runtime.DEFAULT_STALL_WARNING_S == 300


def test_ray_chatter_stays_off_the_terminal():
    import logging

    runtime.configure_progress(None)
    console = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    assert console and all(h.level >= logging.WARNING for h in console)  # Ray Data's INFO lines go to its log file
    runtime._quiet_token_auth_notice()
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def shown(message):
        return auth_log.filter(logging.LogRecord(auth_log.name, logging.WARNING, __file__, 1, message, (), None))

    assert not shown("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert shown("Token authentication is disabled for this Ray cluster. Anyone with network access ...")  # needs action
