"""Tasks in spawned local processes, for work that must not run on the driver when a run has no Ray.

A local run with nothing left to compute (every row staged by an earlier attempt) starts no Ray
(a Ray start costs 10-20 s; issue 23), yet its commit still merges files, which never runs on the
driver (issue 29). Spawned processes cost about a second each. This module imports no Ray, so
neither do they.

The one non-obvious decision: each process watches its parent and ends when it is gone. A driver
killed mid-commit (``kill -9``, a crash test's ``os._exit``) would otherwise leave its pool's
processes behind, holding its stdout and stderr open (a caller waiting on them hangs) and
writing files for a run that is over.
"""

from __future__ import annotations

import os
import threading
import time

PARENT_POLL_S = 0.2


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def map_processes(fn, items: list, *, workers: int | None = None):
    """``fn(item)`` for every item in spawned local processes, as many at once as CPUs, yielded as
    they finish. A process that dies fails the call (``BrokenProcessPool``), as a killed Ray task
    with no retries left does."""
    if not items:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    count = max(1, min(len(items), workers or os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(count, mp_context=context, initializer=_watch_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
