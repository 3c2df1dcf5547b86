"""Model calls that halve their batch on GPU out-of-memory instead of failing the run.

A batch size that fits one card can overflow a smaller one, or one shared with another
stage. Each row's result does not depend on which rows share its batch (the scorer's and the
captioner's batch-invariance tests), so a batch run in smaller parts gives the same rows. The
smaller size is kept for the actor's later batches, so the out-of-memory is paid once, not
once per batch; one row that still does not fit is a real failure and is raised.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class HalvingBatches:
    def __init__(self, what: str):
        self.what = what
        self.rows_per_call: int | None = None  # set once a call ran out of memory

    def run(self, call: Callable[[int, int], T], rows: int) -> list[T]:
        """``call(start, stop)`` over rows ``[0, rows)`` in parts; the parts' results in order."""
        import torch

        if rows == 0:
            return [call(0, 0)]
        results: list[T] = []
        start, size = 0, min(rows, self.rows_per_call or rows)
        while start < rows:
            stop = min(rows, start + size)
            try:
                results.append(call(start, stop))
                start = stop
                continue
            except torch.OutOfMemoryError:
                if stop - start == 1:
                    raise
            # Outside the except block, so the exception's frames (and the tensors they hold)
            # are released before the cache is emptied and the smaller part runs.
            size = (stop - start) // 2
            self.rows_per_call = size
            log.warning("%s ran out of GPU memory at %d rows per call; continuing at %d", self.what, stop - start, size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return results
