"""The cloud and Kubernetes manifests, validated offline against their tools' own schemas:

- cluster/aws.yaml against Ray's cluster-launcher schema (``ray/autoscaler/ray-schema.json`` in the installed
  ray wheel) with jsonschema, and as ``ray up`` checks it (``prepare_config`` + ``validate_config``, offline);
- the RayJob of cluster/kuberay/rayjob.yaml against the openAPIV3Schema of KubeRay's ``rayjobs.ray.io`` CRD
  (``ray-operator/config/crd/bases/ray.io_rayjobs.yaml``, tag v1.7.0). No PyPI package ships that CRD, and
  this repository keeps no copy of it: the test reads it from ``$KUBERAY_CRD`` or
  ``<repo>/../shared/schemas/kuberay/v1.7.0/ray.io_rayjobs.yaml`` and is skipped without it. Unknown fields
  are refused as ``kubectl apply --validate=strict`` would (a CRD's schema would silently prune them).

Both also get checks of what the pipeline needs from them (shared storage at one path on every node, GPU
workers, token auth, the MLflow server, the entrypoint), independent of the schemas.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipeline.config import REPO_ROOT

AWS = REPO_ROOT / "cluster" / "aws.yaml"
RAYJOB = REPO_ROOT / "cluster" / "kuberay" / "rayjob.yaml"
KUBERAY_VERSION = "v1.7.0"
CRD_CANDIDATES = [
    os.environ.get("KUBERAY_CRD"),
    REPO_ROOT.parent / "shared" / "schemas" / "kuberay" / KUBERAY_VERSION / "ray.io_rayjobs.yaml",
    Path("/work/shared/schemas/kuberay") / KUBERAY_VERSION / "ray.io_rayjobs.yaml",
]


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def launcher_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(config)]


def test_cluster_yaml_is_valid_for_rays_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(AWS.read_text())
    assert launcher_errors(config) == []
    # As `ray up` does before starting anything: AWS defaults merged in, then the schema and node-type rules.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu"]["max_workers"] == 4
    # The schema has teeth: a misspelt key or a wrong type is refused.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["resources"]["GPU"] = "one"
    broken["head_start_ray_comands"] = []
    assert len(launcher_errors(broken)) == 2


def test_cluster_yaml_has_gpu_workers_shared_storage_token_auth_and_mlflow_on_the_head():
    config = yaml.safe_load(AWS.read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["GPU"] == 0
    assert types["gpu"]["resources"]["GPU"] >= 1 and types["gpu"]["min_workers"] >= 2
    setup = " ".join(config["setup_commands"])
    assert "mount -t nfs4" in setup and "/mnt/vlp" in setup  # the work dir's file system, on every node
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "sqlite:////mnt/vlp/work/mlflow.db" in head


def manifest_documents() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(RAYJOB.read_text())}


def crd_schema() -> dict:
    for candidate in CRD_CANDIDATES:
        if candidate and Path(candidate).is_file():
            crd = yaml.safe_load(Path(candidate).read_text())
            assert crd["metadata"]["name"] == "rayjobs.ray.io"
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            return version["schema"]["openAPIV3Schema"]
    pytest.skip(f"KubeRay's RayJob CRD ({KUBERAY_VERSION}) not found: set KUBERAY_CRD or put it at "
                f"{CRD_CANDIDATES[1]}")


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the structural schema does not declare (kubectl's strict field validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def rayjob_errors(rayjob: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(rayjob)]
    return errors + [f"{field}: unknown field" for field in unknown_fields(rayjob, schema)]


def test_rayjob_is_valid_against_kuberays_crd():
    schema = crd_schema()
    rayjob = manifest_documents()["RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob_errors(rayjob, schema) == []
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"  # not in the enum
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # misspelt
    assert len(rayjob_errors(broken, schema)) == 2


def pod_specs(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs |= {g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}
    return specs


def test_rayjob_shares_one_rwx_volume_runs_the_pipeline_from_the_image_with_token_auth():
    docs = manifest_documents()
    rayjob, pvc = docs["RayJob"], docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = rayjob["spec"]
    assert spec["entrypoint"].split()[:6] == ["python", "/app/pipeline/run.py", "--stage", "all", "--workdir",
                                              "/mnt/vlp/work"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert "working_dir" not in yaml.safe_load(spec["runtimeEnvYAML"])  # a RayJob cannot upload one
    pods = pod_specs(rayjob) | {"mlflow": docs["Deployment"]["spec"]["template"]["spec"]}
    for name, pod in pods.items():
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], name
        for container in pod["containers"]:
            assert {"name": volume["name"], "mountPath": "/mnt/vlp"} in container["volumeMounts"], name
    for name in ("head", "gpu"):
        assert {"name": "PYTHONPATH", "value": "/app"} in pods[name]["containers"][0]["env"]
    assert pods["gpu"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    mlflow = " ".join(docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"])
    port = docs["Service"]["spec"]["ports"][0]["port"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == (
        f"http://{docs['Service']['metadata']['name']}:{port}")
    assert "sqlite:////mnt/vlp/work/mlflow.db" in mlflow
