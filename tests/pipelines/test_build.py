import pytest

from pipelines.build import resolve_resources
from pipelines.config import build_config

BASE = {"input": "in", "output": "out"}


@pytest.mark.parametrize(
    "device, cluster_gpus, gpus, model_device",
    [("cpu", 8, 0.0, "cpu"), ("cuda", 0, 1.0, "cuda"), ("auto", 4, 1.0, "auto"), ("auto", 0, 0.0, "cpu")],
)
def test_gpu_defaults_come_from_device_and_cluster(device, cluster_gpus, gpus, model_device):
    resources = resolve_resources(build_config(dict(BASE, device=device)), cluster_gpus, cluster_cpus=16)
    assert resources.score_gpus == resources.caption_gpus == gpus
    assert resources.score_device == resources.caption_device == model_device


def test_explicit_fractional_gpus_win():
    config = build_config(dict(BASE, score_gpus=0.25, caption_gpus=0.75))
    resources = resolve_resources(config, cluster_gpus=1, cluster_cpus=16)
    assert (resources.score_gpus, resources.caption_gpus) == (0.25, 0.75)
    assert resources.score_cpus == resources.caption_cpus == 1.0


def test_cpu_actors_leave_room_for_decoding_on_small_machines():
    resources = resolve_resources(build_config(dict(BASE, device="cpu")), cluster_gpus=0, cluster_cpus=2)
    assert resources.score_cpus + resources.caption_cpus < 2
    single = resolve_resources(build_config(dict(BASE, device="cpu", captions="none")), 0, cluster_cpus=2)
    assert single.score_cpus == 1.0


def test_explicit_cpus_win():
    config = build_config(dict(BASE, device="cpu", score_cpus=2, caption_cpus=0.5))
    resources = resolve_resources(config, cluster_gpus=0, cluster_cpus=2)
    assert (resources.score_cpus, resources.caption_cpus) == (2, 0.5)
