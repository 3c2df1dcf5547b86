"""Host work beside device work: two batches in flight per model actor, one model call at a time.

A model actor spends part of every batch on the host: tokenising, gathering the uint8 pixels
into page-locked memory, copying results back, building Arrow columns. Run one batch at a
time and the GPU idles through all of it (78% utilisation for scoring on an H200, last
round). With two calls in flight (Ray's ``max_concurrent_calls_per_actor=2``), batch N+1's host
work runs while batch N computes. What must not run twice at once is the model itself (two
forward passes would double the activations on the card and interleave their kernels), so
each operator holds a ``DeviceTurn``: the model call takes it; staging before and copying out
after do not.

On CUDA the turn covers only *enqueueing* the model's kernels: the pixels cross on a side
stream (``to_device``) and results come back through a pinned buffer and an event
(``ToHost``), so the next batch's kernels queue up behind this one's and the card never
drains between batches. On the CPU the model call is synchronous and the overlap is the
host work of one call (Arrow, tokenising) against torch's threads in the other.

Fast tokenizers are one Rust object shared by every thread; transformers reconfigures its
truncation and padding on every call, which PyO3 refuses while another thread is encoding
("Already borrowed", transformers #47085). The pinned tokenizers 0.23.3 did not show it in
4,000 mixed calls from 16 threads here, but nothing in the API promises that, so every
tokenizer call of an operator goes through its ``tokenizer_lock``: tokenising is
microseconds against milliseconds of model time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


class DeviceTurn:
    """One model call at a time per operator; counts how often a caller had to wait (tests, benchmarks)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waits = 0

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.waits += 1
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


_streams: dict = {}
_streams_lock = threading.Lock()


def _copy_stream(device):
    """One side stream per thread and device for host-to-device copies (created on first use)."""
    import torch

    key = (threading.get_ident(), str(device))
    with _streams_lock:
        if key not in _streams:
            _streams[key] = torch.cuda.Stream(device=device)
        return _streams[key]


def to_device(tensor, device: str):
    """``tensor`` (pinned host memory on CUDA) on ``device``. On CUDA the copy runs on a side stream
    and the current stream waits for it, so it overlaps the model work already queued there."""
    import torch

    if torch.device(device).type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()  # a pageable copy would wait for the model work queued before it
    stream = _copy_stream(device)
    # No wait on the current stream: the source was written on the host, and waiting would queue the
    # copy behind the previous batch's model work, which is what the side stream is for.
    with torch.cuda.stream(stream):
        moved = tensor.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(stream)
    # Allocated on the side stream, used on the current one: keep the block until that use ends.
    moved.record_stream(torch.cuda.current_stream(device))
    return moved


@dataclass
class ToHost:
    """Device results on their way to host memory: started inside the device turn, read outside it."""

    tensors: tuple
    event: object = None

    @classmethod
    def start(cls, *tensors) -> "ToHost":
        import torch

        if not tensors or tensors[0].device.type != "cuda":
            return cls(tuple(t.detach() for t in tensors))
        copies = []
        for tensor in tensors:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor.detach(), non_blocking=True)
            copies.append(host)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensors[0].device))
        return cls(tuple(copies), event)

    def numpy(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()  # waits for this batch's kernels only, not the next batch's
        return [t.numpy() for t in self.tensors]
