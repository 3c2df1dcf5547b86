"""Connecting to Ray: reuse a running session, start a local one, or join a cluster."""

from __future__ import annotations

import logging

import ray


def connect(address: str | None) -> bool:
    """Returns True when this call started Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    return True


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))
