import pytest

from pipelines.config import build_config
from pipelines.dataflow.resources import ResourceError, check_fits, resolve_resources, resource_problem

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


@pytest.mark.parametrize("cluster_cpus, share", [(0.5, 0.25), (0.9, 0.25), (1.0, 0.25), (1.6, 0.4), (8, 1.0)])
def test_cpu_share_has_a_quarter_cpu_floor_and_a_one_cpu_ceiling(cluster_cpus, share):
    # Two model stages split half the CPUs: below one CPU in all, each actor still gets a quarter.
    resources = resolve_resources(build_config(dict(BASE, device="cpu")), 0, cluster_cpus=cluster_cpus)
    assert resources.score_cpus == resources.caption_cpus == pytest.approx(share)


def test_explicit_cpus_win():
    config = build_config(dict(BASE, device="cpu", score_cpus=2, caption_cpus=0.5))
    resources = resolve_resources(config, cluster_gpus=0, cluster_cpus=2)
    assert (resources.score_cpus, resources.caption_cpus) == (2, 0.5)


@pytest.mark.parametrize(
    "overrides, cluster_gpus, expected",
    [
        ({"device": "cpu"}, 4, (64, 16)),  # CPU actors: small batches, even on a GPU cluster
        ({}, 0, (64, 16)),
        # GPU actors: batches that keep the GPU busy (captions: the most per call, fitted to free memory in the actor)
        ({}, 2, (256, 512)),
        ({"device": "cuda"}, 0, (256, 512)),
        ({"score_gpus": 0, "caption_gpus": 0.5}, 1, (64, 512)),  # each stage by its own placement
        ({"score_batch_size": 32, "caption_batch_size": "auto"}, 2, (32, 512)),
        ({"score_batch_size": "auto", "caption_batch_size": 7}, 0, (64, 7)),
    ],
)
def test_batch_sizes_follow_each_stages_placement_unless_set(overrides, cluster_gpus, expected):
    resources = resolve_resources(build_config(dict(BASE, **overrides)), cluster_gpus, cluster_cpus=16)
    assert (resources.score_batch_size, resources.caption_batch_size) == expected


class _RecordingDataset:
    """Stands in for a Dataset: records each stage's map_batches arguments, runs nothing."""

    def __init__(self):
        self.calls = {}

    def map_batches(self, fn, **kwargs):
        self.calls[getattr(fn, "__name__", type(fn).__name__)] = kwargs
        return self


@pytest.mark.parametrize("cluster_gpus, expected", [(0, (64, 16)), (1, (256, 512))])
def test_model_stages_run_at_the_resolved_batch_sizes(cluster_gpus, expected):
    from pipelines.dataflow.graph import score_rows

    config = build_config(dict(BASE, caption_model="some/blip2", decode_batch_size=9))
    resources = resolve_resources(config, cluster_gpus, cluster_cpus=16)
    ds = score_rows(_RecordingDataset(), config, "run", resources, passthrough=["id"])
    sizes = {name: ds.calls[name]["batch_size"] for name in ("decode_batch", "ScoreStage", "CaptionStage")}
    assert sizes == {"decode_batch": 9, "ScoreStage": expected[0], "CaptionStage": expected[1]}


def test_batch_size_flags_and_auto_reach_the_config():
    from jobs import score

    base = ["--input", "in", "--output", "out"]
    config = score.config_from_args(score.make_parser().parse_args([*base, "--score-batch-size", "512", "--caption-batch-size", "auto"]))
    assert (config.score_batch_size, config.caption_batch_size) == (512, None)


@pytest.mark.parametrize(
    "overrides, cluster_gpus, cluster_cpus, expected",
    [
        ({"device": "cpu"}, 0, 2, None),  # the defaults always fit
        ({"device": "cpu", "caption_model": "m"}, 0, 2, None),
        ({}, 1, 16, None),
        ({"device": "cpu", "score_actors": "2,2", "score_cpus": 1}, 0, 2, "2 scoring actors x 1 = 2 CPUs of the cluster's 2, leaving 0"),
        ({"device": "cpu", "score_cpus": 2}, 0, 2, "--score-cpus (now 2)"),
        ({"device": "cpu", "score_actors": "1,8", "score_cpus": 1}, 0, 2, None),  # only the minimum must fit
        ({"device": "cpu", "caption_model": "m", "caption_cpus": 1}, 0, 2, "1 captioning actor x 1"),
        ({"device": "cuda"}, 0, 8, "need 1 scoring actor x 1 = 1 GPUs, and the cluster has 0"),
        ({"score_actors": "3,3"}, 2, 16, "--score-actors MIN (now 3), --score-gpus (now 1)"),
        ({"score_actors": "4,4", "score_gpus": 0.5}, 2, 16, None),
    ],
)
def test_resource_problem_names_the_numbers_and_the_flag(overrides, cluster_gpus, cluster_cpus, expected):
    config = build_config(dict(BASE, caption_model=overrides.pop("caption_model", "none"), **overrides))
    problem = resource_problem(config, resolve_resources(config, cluster_gpus, cluster_cpus), cluster_gpus, cluster_cpus)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem


def test_check_fits_refuses_on_a_local_ray_and_warns_on_a_joined_cluster(caplog):
    starving = dict(BASE, device="cpu", caption_model="none", score_cpus=2)
    local = build_config(starving)
    with pytest.raises(ResourceError, match="cannot run on this machine's Ray"):
        check_fits(local, resolve_resources(local, 0, 2), 0, 2)
    joined = build_config(dict(starving, ray_address="auto"))  # its autoscaler may still add nodes
    check_fits(joined, resolve_resources(joined, 0, 2), 0, 2)
    assert "unless the cluster's autoscaler adds nodes" in caplog.text


@pytest.mark.parametrize(
    "overrides, cluster_gpus, cluster_cpus, threads",
    [
        ({"device": "cpu"}, 0, 2, (2, None)),  # one actor, both cores (Ray alone would give it one)
        ({"device": "cpu"}, 0, 16, (2, None)),  # up to 8 actors x 2 threads on a 16-core laptop
        ({"device": "cpu", "caption_model": "m"}, 0, 2, (1, 1)),  # two stages share two cores
        ({"device": "cpu", "caption_model": "m"}, 0, 16, (2, 2)),  # 4 + 4 actors x 2 threads
        ({"device": "cpu", "score_cpus": 0.5, "score_actors": "2,2"}, 0, 2, (1, None)),  # set: Ray's rule
        ({"device": "cpu", "score_cpus": 3}, 0, 16, (3, None)),
        ({}, 8, 64, (1, 1)),  # a GPU actor only feeds its GPU
        ({"score_gpus": 0, "caption_model": "m"}, 1, 16, (4, 1)),  # 4 CPU scoring actors x 4 beside a GPU captioner
    ],
)
def test_model_threads_share_every_core_among_the_cpu_actors(overrides, cluster_gpus, cluster_cpus, threads):
    config = build_config(dict(BASE, caption_model=overrides.pop("caption_model", "none"), **overrides))
    resources = resolve_resources(config, cluster_gpus, cluster_cpus)
    assert resources.score_threads == threads[0]
    if threads[1] is not None:
        assert resources.caption_threads == threads[1]
