"""Local process tasks (``pipelines.dataflow.local``): results from other processes, and no process
left behind when the driver is killed mid-task."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.dataflow.local import map_processes

ROOT = Path(__file__).resolve().parents[3]


def test_results_come_from_other_processes():
    pids = list(map_processes(_pid, [1, 2, 3]))
    assert len(pids) == 3 and os.getpid() not in pids


def _pid(_item) -> int:
    return os.getpid()


DRIVER = """
import os, sys, time
from pipelines.dataflow.local import map_processes
from tests.pipelines.dataflow.test_local import _sleep_after_marker
for _ in map_processes(_sleep_after_marker, [sys.argv[1]]):
    pass
"""


def _sleep_after_marker(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)


def test_a_killed_driver_leaves_no_task_process_behind(tmp_path):
    marker = tmp_path / "started"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 300  # generous: spawning and importing pyarrow on a loaded machine
    while not marker.exists() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), driver.communicate()
    child = int(marker.read_text())
    driver.kill()  # SIGKILL: no cleanup runs in the driver
    # The task process held the driver's stdout and stderr; they close once it has ended too
    # (bounded well below the task's 600 s sleep, reached only when the watch is broken).
    driver.communicate(timeout=120)
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # a zombie has ended
