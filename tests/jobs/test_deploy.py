"""deploy/: the KubeRay manifests parse, hang together, and run commands the CLIs accept (no cluster here)."""

import shlex
from pathlib import Path

import pytest
import yaml

from jobs import nightly, score

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def documents(name):
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def by_kind(name):
    return {doc["kind"]: doc for doc in documents(name)}


@pytest.fixture(scope="module")
def rayjob():
    (job,) = documents("rayjob.yaml")
    return job


@pytest.fixture(scope="module")
def nightly_rayjob():
    template = by_kind("nightly-cronjob.yaml")["ConfigMap"]["data"]["rayjob.yaml"]
    return yaml.safe_load(template)


def test_every_manifest_parses_with_kind_and_metadata():
    files = sorted(p.name for p in DEPLOY.glob("*.yaml"))
    assert files == ["nightly-cronjob.yaml", "rayjob.yaml", "s3-credentials.example.yaml"]
    for name in files:
        for doc in documents(name):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"], name


def _containers(job):
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize("which", ["rayjob", "nightly_rayjob"])
def test_rayjob_cluster(which, request):
    job = request.getfixturevalue(which)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-score", "gpu-caption"}
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] > group["minReplicas"], f"{name} has no autoscaling range"
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == name.startswith("gpu-"), name
    # S3 credentials come from the Secret, in every pod (all of them read or write S3).
    (secret,) = documents("s3-credentials.example.yaml")
    assert secret["kind"] == "Secret" and set(secret["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for container in _containers(job):
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        assert refs == [secret["metadata"]["name"]], container["name"]
        assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(container.get("env", []))


def test_entrypoints_are_valid_commands(rayjob, nightly_rayjob):
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.score"]
    config = score.config_from_args(score.make_parser().parse_args(words[3:]))
    assert config.ray_address == "auto" and config.input.startswith("s3://") and config.output.startswith("s3://")
    assert config.score_gpus == 1 and config.caption_gpus == 1 and config.report_category_column == "category"
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    # Each pool can grow to the GPUs its group can grow to.
    assert config.score_actors[1] <= groups["gpu-score"]["maxReplicas"]
    assert config.caption_actors[1] <= groups["gpu-caption"]["maxReplicas"]

    words = shlex.split(nightly_rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.nightly"]
    args = nightly.make_parser().parse_args(words[3:])
    assert args.catalog.startswith("s3://") and args.ray_address == "auto"


def test_nightly_cronjob_creates_the_same_cluster(rayjob, nightly_rayjob):
    kinds = by_kind("nightly-cronjob.yaml")
    assert nightly_rayjob["spec"]["rayClusterSpec"] == rayjob["spec"]["rayClusterSpec"]
    assert "generateName" in nightly_rayjob["metadata"]  # a new RayJob each night
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"] == ["kubectl", "create", "-f", f"{mount}/rayjob.yaml"]
    assert pod["volumes"][0]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    # The pod's service account may create RayJobs, and nothing more.
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    (rule,) = kinds["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    assert kinds["RoleBinding"]["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
