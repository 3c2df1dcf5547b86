"""Out-of-memory halves the part size and keeps it; results stay in row order."""

import pytest
import torch

from blip_ops.oom import HalvingBatches


class _Card:
    """A fake model call that runs out of memory above ``fits`` rows and records each call."""

    def __init__(self, fits: int):
        self.fits, self.calls = fits, []

    def __call__(self, start: int, stop: int) -> list[int]:
        self.calls.append(stop - start)
        if stop - start > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return list(range(start, stop))


def _rows(parts):
    return [row for part in parts for row in part]


def test_a_batch_that_fits_runs_in_one_call():
    card, runner = _Card(fits=8), HalvingBatches("scoring")
    assert _rows(runner.run(card, 8)) == list(range(8))
    assert card.calls == [8] and runner.rows_per_call is None


def test_out_of_memory_halves_until_it_fits_and_keeps_the_size(caplog):
    card, runner = _Card(fits=3), HalvingBatches("scoring")
    assert _rows(runner.run(card, 10)) == list(range(10))
    assert card.calls[:3] == [10, 5, 2]  # halved twice, then parts of 2 to the end
    assert set(card.calls[3:]) == {2} and runner.rows_per_call == 2
    assert "scoring ran out of GPU memory at 10 rows per call; continuing at 5" in caplog.text
    card.calls.clear()
    assert _rows(runner.run(card, 5)) == list(range(5))  # the next batch starts at the kept size
    assert card.calls == [2, 2, 1]


def test_one_row_that_does_not_fit_is_raised():
    with pytest.raises(torch.OutOfMemoryError):
        HalvingBatches("captioning").run(_Card(fits=0), 4)


def test_other_errors_are_not_retried():
    calls = []

    def broken(start, stop):
        calls.append(stop - start)
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        HalvingBatches("scoring").run(broken, 6)
    assert calls == [6]


def test_no_rows_is_one_empty_call():
    card = _Card(fits=1)
    assert HalvingBatches("scoring").run(card, 0) == [[]] and card.calls == [0]
