"""Two threads scoring with one scorer: host work of one batch runs during the other's model call,
the model runs one batch at a time, and every row's scores are the ones a lone call gives."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from blip_ops.captioner import Blip2Captioner
from blip_ops.overlap import DeviceTurn, ToHost
from blip_ops.scorer import BlipScorer

TEXTS = ["a red shoe", "two dogs on a beach at sunset", "a bowl of soup", "a blue running shoe with white laces",
         "a cat", "an old brick house with a green door", "a bicycle", "three apples on a table"]


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.RandomState(0)
    return [(rng.rand(20 + 9 * i, 30 + 5 * i, 3) * 255).astype(np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def scorer(tiny_itm):
    return BlipScorer.from_pretrained(tiny_itm, device="cpu")


def _batches(scorer, count=4, rows=2):
    pixels = [scorer.images.resize(image) for image in _images(count * rows)]
    return [(pixels[i * rows:(i + 1) * rows], TEXTS[i * rows:(i + 1) * rows]) for i in range(count)]


# Generous bound on each wait below: a loaded 2-core machine delays a thread by seconds, never by a
# minute. The test does not wait it out when the code overlaps as it should; when the code is broken
# (host work serialised behind the model), the first model call waits this long and the test fails.
PATIENCE_S = 60.0


class _Causality:
    """Records order, not clock times. The first model call holds on until some batch's host work has
    started and finished while it is in flight; the second host call starts only once a model call is
    in flight. So the overlap, when the code allows it, happens on every run however busy the machine,
    and when the code does not allow it, it never happens."""

    def __init__(self):
        self._lock = threading.Lock()
        self.model_calls = 0
        self.host_calls = 0
        self.in_flight: set[int] = set()  # model calls entered and not yet left
        self.most_in_flight = 0
        self.host_inside_model: list[tuple[int, int]] = []  # (host call, model call it ran wholly inside)
        self.model_started = threading.Event()
        self.overlapped = threading.Event()
        self.second_model = threading.Event()

    def model(self, function):
        def wrapped(*args, **kwargs):
            with self._lock:
                call = self.model_calls
                self.model_calls += 1
                self.in_flight.add(call)
                self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
            self.model_started.set()
            if call:
                self.second_model.set()
            else:
                self.overlapped.wait(PATIENCE_S)
                # A slow model: the other thread, its host work done, now heads for the model. Were the
                # model not one batch at a time, it would enter within milliseconds and be seen in
                # flight; in correct code it never enters, so this wait always runs out (its length
                # only sets how slow a broken machine may be and still be caught, never a failure).
                self.second_model.wait(1.0)
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.in_flight.discard(call)

        return wrapped

    def host(self, function):
        def wrapped(*args, **kwargs):
            with self._lock:
                call = self.host_calls
                self.host_calls += 1
            if call == 1:
                self.model_started.wait(PATIENCE_S)
            with self._lock:
                before = set(self.in_flight)
            result = function(*args, **kwargs)
            with self._lock:
                for model_call in sorted(before & self.in_flight):
                    self.host_inside_model.append((call, model_call))
                if before & self.in_flight:
                    self.overlapped.set()
            return result

        return wrapped


def test_host_work_of_one_batch_runs_while_another_computes_and_scores_stay(scorer, monkeypatch):
    batches = _batches(scorer)
    alone = [scorer.score(images, texts) for images, texts in batches]

    seen = _Causality()
    monkeypatch.setattr(scorer, "_forward", seen.model(scorer._forward))
    monkeypatch.setattr(scorer, "tokenize", seen.host(scorer.tokenize))
    with ThreadPoolExecutor(2) as pool:  # Ray's two concurrent calls per actor
        together = list(pool.map(lambda batch: scorer.score(*batch), batches))

    assert seen.model_calls == seen.host_calls == len(batches)
    # The model ran one batch at a time...
    assert seen.most_in_flight == 1
    # ...and some batch's host work started and finished inside another batch's model call.
    assert seen.host_inside_model, "no host work ran while a model call was in flight"
    for (itc, itm, truncated), (itc2, itm2, truncated2) in zip(alone, together):
        np.testing.assert_array_equal(itc, itc2)
        np.testing.assert_array_equal(itm, itm2)
        np.testing.assert_array_equal(truncated, truncated2)


class _BorrowChecked:
    """A tokenizer that refuses, as PyO3 does, to be entered by a second thread while in use."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.busy = threading.Lock()
        self.refused = 0

    def __call__(self, *args, **kwargs):
        if not self.busy.acquire(blocking=False):
            self.refused += 1
            raise RuntimeError("Already borrowed")
        try:
            time.sleep(0.02)
            return self.tokenizer(*args, **kwargs)
        finally:
            self.busy.release()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_tokenizer_calls_from_two_threads_never_overlap(scorer, monkeypatch):
    """transformers #47085: the guard is what keeps this test green (without it, calls are refused)."""
    checked = _BorrowChecked(scorer.tokenizer)
    monkeypatch.setattr(scorer, "tokenizer", checked)

    def work(i):
        return scorer.tokenize(TEXTS).input_ids if i % 2 else scorer.token_counts(TEXTS)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(16)))
    assert checked.refused == 0


def test_captions_from_two_threads_equal_lone_calls(tiny_caption):
    captioner = Blip2Captioner.from_pretrained(tiny_caption, device="cpu", max_new_tokens=4)
    pixels = [captioner.images.resize(image) for image in _images(6)]
    batches = [pixels[0:2], pixels[2:4], pixels[4:6]]
    alone = [captioner.caption(batch) for batch in batches]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(captioner.caption, batches)) == alone


def test_device_turn_counts_waits_and_to_host_on_the_cpu_is_the_values():
    import torch

    turn = DeviceTurn()
    with turn:
        waiter = threading.Thread(target=lambda: turn.__enter__() and turn.__exit__(None, None, None))
        waiter.start()
        # Release the turn only once the waiter has found it taken (order, not a sleep: on a busy
        # machine the waiter may take seconds to run; PATIENCE_S bounds a broken count).
        deadline = time.monotonic() + PATIENCE_S
        while turn.waits == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    waiter.join()
    assert turn.waits == 1
    (values,) = ToHost.start(torch.arange(3.0)).numpy()
    np.testing.assert_array_equal(values, [0.0, 1.0, 2.0])


def test_the_agreement_encoder_guards_its_tokenizer_too():
    from blip_ops.agreement import SentenceEncoder
    from pipelines.config import DEFAULT_AGREEMENT_MODEL

    encoder = SentenceEncoder.from_pretrained(DEFAULT_AGREEMENT_MODEL)
    checked = _BorrowChecked(encoder.tokenizer)
    encoder.tokenizer = checked
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: encoder.encode(TEXTS[:3]), range(6)))
    assert checked.refused == 0
    assert all(np.array_equal(r, results[0]) for r in results)
