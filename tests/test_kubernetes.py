"""deploy/kubernetes/ (README, "Running on Kubernetes"): every kustomization renders (the API's base, its
cpu and gpu overlays, the KServe InferenceService, the PyTorchJob, the TrainJob and its runtime); every
built-in object, and every pod inside a custom resource, passes the Kubernetes schema (kubernetes-validate,
offline: it bundles the schemas); the custom resources (InferenceService, PyTorchJob, TrainJob,
TrainingRuntime, ServiceMonitor) pass the JSON Schemas in deploy/kubernetes/crd-schemas.json, written from
their CRDs; the API's pod runs as the image's unprivileged user with the settings docker-compose gives it,
and the overlays and the InferenceService change only what they mean to; the TrainJob's pod, as Kubeflow
Trainer fills it in, is the PyTorchJob's; each job's command, run as its operator would run it on two
nodes, trains and resumes; every probe path answers on a live service, and every series that the HPA, the
prometheus-adapter rule and the Grafana dashboard read is one its /metrics exports; checkov finds nothing
it was not told to skip (installed into its own virtual environment, .venv-checkov, on first use)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from support.service import free_port, write_checkpoint
from support.training import make_source, prepare_quietly

from training.__main__ import _parser as training_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
KUSTOMIZATIONS = (
    "base", "overlays/cpu", "overlays/gpu", "kserve", "training", "trainjob", "training-claims", "checkpoints"
)  # fmt: skip
BUILT_IN_GROUPS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}
CRD_SCHEMAS = json.loads((DEPLOY / "crd-schemas.json").read_text())
# spec.predictor fields of an InferenceService that are KServe's own, not the inlined PodSpec's (component.go,
# predictor.go); everything else in the predictor is a PodSpec field.
PREDICTOR_NOT_POD = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy", "name", "storageUris", "storageContainerName", "workerSpec", "model", "sklearn",
    "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm", "paddle",
}  # fmt: skip
# What Kubeflow Trainer's torch plugin gives the TrainJob's node container (kubeflow/trainer v2.3.0,
# pkg/runtime/framework/plugins/torch/torch.go, pkg/constants/constants.go): node 0's name in the JobSet's
# headless Service, and the port it adds to the container.
TRAINER_MASTER_PORT = 29400
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = REPO / ".venv-checkov"


def render(name: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / name)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations (`kubectl kustomize`)")
    return {name: render(name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def rendered(renders) -> list[dict]:
    return renders["base"]


def by_kind(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def embedded_pods(obj: dict) -> dict[str, dict]:
    """The pods a custom resource makes, as built-in objects: a PyTorchJob's replica templates and a
    TrainingRuntime's replicated jobs' pod templates as PodTemplates, an InferenceService's predictor (less
    KServe's own fields) as a Pod."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "TrainingRuntime":
        jobs = obj["spec"]["template"]["spec"]["replicatedJobs"]
        templates = {job["name"]: job["template"]["spec"]["template"] for job in jobs}
        return {f"{name}-{job}": _pod_template(f"{name}-{job}", t) for job, t in templates.items()}
    if obj["kind"] == "PyTorchJob":
        templates = {replica.lower(): spec["template"] for replica, spec in obj["spec"]["pytorchReplicaSpecs"].items()}
        return {f"{name}-{replica}": _pod_template(f"{name}-{replica}", t) for replica, t in templates.items()}
    if obj["kind"] == "InferenceService":
        pod = {k: v for k, v in obj["spec"]["predictor"].items() if k not in PREDICTOR_NOT_POD}
        return {
            f"{name}-predictor": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{name}-predictor"},
                "spec": pod,
            }
        }
    return {}


def _pod_template(name: str, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def trainer_pod(job: dict, objects: list[dict]) -> dict:
    """The pod Kubeflow Trainer makes for a TrainJob, as a PodTemplate: its runtime's (in `objects`) trainer
    job's pod, with the node container filled in from spec.trainer and the torch plugin's PET_* variables
    and port (pkg/runtime/framework/plugins/torch/torch.go; PET_NODE_RANK from the completion index)."""
    ref = job["spec"]["runtimeRef"]
    (runtime,) = [o for o in objects if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]]
    assert ref["apiGroup"] == runtime["apiVersion"].split("/")[0]
    (node_job,) = [
        j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]
        if j["template"]["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"
    ]  # fmt: skip
    template = copy.deepcopy(node_job["template"]["spec"]["template"])
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "node"]
    trainer = job["spec"]["trainer"]
    container.update(image=trainer["image"], command=trainer["command"], args=trainer["args"],
                     resources=trainer["resourcesPerNode"])  # fmt: skip
    name = job["metadata"]["name"]
    container["env"] = [*container.get("env", []), *trainer["env"],
        {"name": "PET_NNODES", "value": str(trainer["numNodes"])},
        {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", "auto"))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_MASTER_PORT)},
    ]  # fmt: skip
    container["ports"] = [*container.get("ports", []), {"containerPort": TRAINER_MASTER_PORT, "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-node"}, "template": template}


def pods_of(objects: list[dict]) -> list[dict]:
    """Every pod inside the custom resources of one render (embedded_pods), a runtime's as the TrainJob that
    runs on it has the Trainer fill it in."""
    pods = {}
    for obj in objects:
        pods |= embedded_pods(obj)
    for job in (o for o in objects if o["kind"] == "TrainJob"):
        pods.pop(f"{job['spec']['runtimeRef']['name']}-node")
        pods[f"{job['metadata']['name']}-node"] = trainer_pod(job, objects)
    return list(pods.values())


def as_pod(obj: dict) -> dict:
    """A Pod (for checkov, which looks inside built-in kinds only) from embedded_pods' output."""
    if obj["kind"] == "Pod":
        return obj
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**obj["metadata"], **obj["template"].get("metadata", {})},
            "spec": obj["template"]["spec"]}  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory, module_live_service):
    directory = tmp_path_factory.mktemp("kubernetes")
    return module_live_service(checkpoint=write_checkpoint(directory / "small.safetensors", seed=5, width=0.0625))


@pytest.fixture(scope="module")
def exported(service) -> set[str]:
    """Every series name /metrics exports (from its # TYPE lines, so series with no samples yet count too;
    a histogram as its _bucket, _sum and _count series)."""
    text = httpx.get(service.url + "/metrics", timeout=10).text
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    assert "alexnet_queue_depth" in names and "alexnet_http_request_duration_seconds_bucket" in names
    assert 'alexnet_queue_depth{kind="admitted"}' in text
    return names


def test_every_kustomization_is_checked():
    found = sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


def test_renders_the_expected_objects(rendered):
    kinds = sorted((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == sorted(
        [
            ("v1", "PersistentVolumeClaim", "alexnet-checkpoints"),
            ("apps/v1", "Deployment", "alexnet-api"),
            ("v1", "Service", "alexnet-api"),
            ("policy/v1", "PodDisruptionBudget", "alexnet-api"),
            ("autoscaling/v2", "HorizontalPodAutoscaler", "alexnet-api"),
            ("monitoring.coreos.com/v1", "ServiceMonitor", "alexnet-api"),
            ("v1", "ConfigMap", "alexnet-grafana-dashboard"),
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_built_in_objects_pass_the_kubernetes_schema(renders, name):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
    )
    version = kubernetes_validate.utils.latest_version()
    checked = 0
    built_in = [o for o in renders[name] if o["apiVersion"] in BUILT_IN_GROUPS] + pods_of(renders[name])
    for each in built_in:
        kubernetes_validate.validate(each, version, strict=True)  # strict: an unknown field fails
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_custom_resources_pass_their_crd_schema(renders, name):
    jsonschema = pytest.importorskip("jsonschema", reason="pip install kubernetes-validate (dev extra)")
    for obj in renders[name]:
        if obj["apiVersion"] in BUILT_IN_GROUPS:
            continue
        schema = CRD_SCHEMAS[f"{obj['apiVersion']}/{obj['kind']}"]  # a KeyError: a kind without a schema
        jsonschema.Draft202012Validator(schema).validate(obj)


def test_crd_schemas_catch_what_they_are_for(renders):
    """The vendored schemas refuse the mistakes they are there to catch (so that they are not vacuous)."""
    jsonschema = pytest.importorskip("jsonschema", reason="pip install kubernetes-validate (dev extra)")
    isvc = by_kind(renders["kserve"], "InferenceService")
    job = by_kind(renders["training"], "PyTorchJob")
    broken = []
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["protocolVersion"] = "v2"  # a field of predictor.model, not of a custom predictor
    broken.append(wrong)
    wrong = copy.deepcopy(job)
    wrong["spec"]["nprocPerNode"] = 2  # the CRD's type is string
    broken.append(wrong)
    wrong = copy.deepcopy(job)
    wrong["spec"]["pytorchReplicaSpecs"]["Chief"] = wrong["spec"]["pytorchReplicaSpecs"].pop("Worker")
    broken.append(wrong)
    trainjob, runtime = by_kind(renders["trainjob"], "TrainJob"), by_kind(renders["trainjob"], "TrainingRuntime")
    wrong = copy.deepcopy(trainjob)
    wrong["spec"]["trainer"]["numProcPerNode"] = "2"  # an integer since Trainer v2.2 (was int-or-string)
    broken.append(wrong)
    wrong = copy.deepcopy(trainjob)
    wrong["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"})  # the torch plugin's to set
    broken.append(wrong)
    wrong = copy.deepcopy(trainjob)
    wrong["spec"]["podTemplateOverrides"] = []  # before v2.2; runtimePatches since
    broken.append(wrong)
    wrong = copy.deepcopy(runtime)
    wrong["spec"]["template"]["spec"]["replicatedJobs"][0]["replicas"] = 2  # the webhook's: always 1
    broken.append(wrong)
    wrong = copy.deepcopy(by_kind(renders["base"], "ServiceMonitor"))
    wrong["spec"]["endpoints"][0]["interval"] = "15 seconds"
    broken.append(wrong)
    for obj in broken:
        validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[f"{obj['apiVersion']}/{obj['kind']}"])
        assert not validator.is_valid(obj), obj["kind"]


def test_pod_is_unprivileged_and_sized_as_in_compose(rendered):
    deployment = by_kind(rendered, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["image"].split(":")[0] == "alexnet-api"
    assert container["command"] == ["python", "-m", "service"]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", 8000), ("grpc", 8001)]
    security = container["securityContext"]
    assert security["runAsUser"] == 10001 and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"

    env = {e["name"]: e["value"] for e in container["env"]}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]
    default = lambda value: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
    ports = {"ALEXNET_PORT": "8000", "ALEXNET_GRPC_PORT": "8001"}  # as the container's ports say
    assert env == {"ALEXNET_HOST": "0.0.0.0", **ports} | {
        k: default(v) for k, v in compose["environment"].items()
    }
    limits = compose["deploy"]["resources"]["limits"]
    assert default(limits["cpus"]) == "2" and default(limits["memory"]) == "4g"
    assert container["resources"]["limits"] == container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}

    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # compose's start_period

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/checkpoints"]["readOnly"] is True
    claim = volumes[mounts["/checkpoints"]["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "alexnet-checkpoints", "readOnly": True}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert env["ALEXNET_CHECKPOINT"].startswith("/checkpoints/")


def test_service_pdb_and_hpa_select_the_pods(rendered):
    pod_labels = by_kind(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = by_kind(rendered, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
    ]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = by_kind(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = by_kind(rendered, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    hpa = by_kind(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "alexnet-api"}
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "alexnet_queue_admitted"


def series_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that start alexnet_ and are not label names."""
    return set(re.findall(r"\b(alexnet_[a-z0-9_]+)\b(?!\s*=)", expr))


def test_adapter_rule_maps_the_admitted_queue_to_the_hpa_metric(rendered, exported):
    rules = yaml.safe_load((BASE / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    hpa_metric = by_kind(rendered, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = [r for r in rules if r["name"]["as"] == hpa_metric]
    assert series_in(rule["seriesQuery"]) == series_in(rule["metricsQuery"]) == {"alexnet_queue_depth"}
    assert re.fullmatch(rule["name"]["matches"], "alexnet_queue_depth")
    assert 'kind="admitted"' in rule["seriesQuery"] and 'kind="admitted"' in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert series_in(rule["seriesQuery"]) <= exported


def test_dashboard_reads_only_exported_series(rendered, exported):
    configmap = by_kind(rendered, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = set().union(*map(series_in, exprs))
    assert used <= exported, f"series the service does not export: {sorted(used - exported)}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "batch size", "queue depth", "rejections", "reloads", "model"):
        assert topic in titles
    assert any("histogram_quantile" in e and "alexnet_http_request_duration_seconds_bucket" in e for e in exprs)


def test_cpu_overlay_is_the_base(renders):
    assert renders["overlays/cpu"] == renders["base"]


def test_gpu_overlay_changes_only_device_gpu_and_placement(renders):
    base, gpu = (copy.deepcopy(by_kind(renders[n], "Deployment")) for n in ("base", "overlays/gpu"))
    pod = gpu["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "alexnet-api-cuda:latest"
    assert {e["name"]: e["value"] for e in container["env"]}["ALEXNET_DEVICE"] == "cuda"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    # CUDA torch's host-side runtime is resident too, and the service's start-up check counts it
    assert container["resources"]["limits"] == base["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ] | {"nvidia.com/gpu": 1, "memory": "6Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Everything else is the base's.
    for deployment in (base, gpu):
        spec = deployment["spec"]["template"]["spec"]
        spec.pop("nodeSelector", None), spec.pop("tolerations", None)
        (c,) = spec["containers"]
        c.pop("image"), c["resources"]["requests"].pop("nvidia.com/gpu", None)
        c["resources"]["limits"].pop("nvidia.com/gpu", None)
        c["resources"]["requests"].pop("memory"), c["resources"]["limits"].pop("memory")
        c["env"] = sorted((e for e in c["env"] if e["name"] != "ALEXNET_DEVICE"), key=lambda e: e["name"])
    assert gpu == base
    others = lambda objects: [o for o in objects if o["kind"] != "Deployment"]
    assert others(renders["overlays/gpu"]) == others(renders["base"])


def test_inference_service_runs_the_base_pod_with_the_v2_protocol(renders):
    base = by_kind(renders["base"], "Deployment")["spec"]["template"]["spec"]
    (api,) = base["containers"]
    isvc = by_kind(renders["kserve"], "InferenceService")
    assert isvc["metadata"]["name"] == "alexnet"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    assert "protocolVersion" not in predictor
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env.pop("PROTOCOL") == "v2"
    assert env == {e["name"]: e["value"] for e in api["env"]}
    assert container["resources"] == api["resources"]
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    for key in ("image", "command", "securityContext", "volumeMounts", "imagePullPolicy"):
        assert container[key] == api[key], key
    assert [p["containerPort"] for p in container["ports"]] == [p["containerPort"] for p in api["ports"]]
    for key in ("securityContext", "volumes", "automountServiceAccountToken", "terminationGracePeriodSeconds"):
        assert predictor[key] == base[key], key
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["containerPort"]
        assert {k: v for k, v in container[probe].items() if k != "httpGet"} == {
            k: v for k, v in api[probe].items() if k != "httpGet"
        }
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 10)
    assert by_kind(renders["kserve"], "PersistentVolumeClaim") == by_kind(renders["base"], "PersistentVolumeClaim")


def probe_paths(renders) -> set[str]:
    paths = set()
    for objects in renders.values():
        for obj in objects:
            pods = [obj["spec"]["template"]["spec"]] if obj["kind"] == "Deployment" else []
            pods += [p.get("spec") or p["template"]["spec"] for p in embedded_pods(obj).values()]
            for pod in pods:
                for container in pod["containers"]:
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        if probe in container:
                            paths.add(container[probe]["httpGet"]["path"])
    return paths


def test_every_probe_path_answers_on_a_live_service(renders, service):
    paths = probe_paths(renders)
    assert paths == {"/readyz", "/healthz", "/v2/health/ready", "/v2/health/live"}
    for path in sorted(paths) + ["/v2/models/alexnet/ready"]:  # the model name KServe's v2 URLs use
        assert httpx.get(service.url + path, timeout=10).status_code == 200, path


def test_pytorchjob_shape(renders):
    job = by_kind(renders["training"], "PyTorchJob")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "2" and "elasticPolicy" not in spec
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "alexnet-train:latest"
        assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("pytorchjob-port", 23456)]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"] and resources["limits"]["nvidia.com/gpu"] == 2
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["/data"]["readOnly"] is True
        assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"] == {
            "claimName": "alexnet-prepared", "readOnly": True}  # fmt: skip
        assert not mounts["/checkpoints"].get("readOnly")
        run_claim = volumes[mounts["/checkpoints"]["name"]]["persistentVolumeClaim"]
        assert run_claim["claimName"] == "alexnet-training-run" and not run_claim.get("readOnly")
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= replica["template"]["metadata"]["labels"].items()
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_SOCKET_IFNAME"] and env["NCCL_DEBUG"]
        # The training flags parse as `python -m training train` does, and the GPU flags say 2 processes × 1 GPU.
        args = training_parser().parse_args(["train", "/data", "--out", "/checkpoints", *container["args"]])
        assert args.devices == "cuda:0" and args.workers == int(resources["limits"]["cpu"]) // 2 - 1
        script = container["command"][2]
        assert container["command"][:2] == ["/bin/sh", "-c"]
        for flag, variable in [("nnodes", "PET_NNODES"), ("nproc-per-node", "PET_NPROC_PER_NODE"),
                               ("node-rank", "PET_NODE_RANK"), ("master-addr", "PET_MASTER_ADDR"),
                               ("master-port", "PET_MASTER_PORT")]:  # fmt: skip
            assert re.search(rf'--{flag}="\${{{variable}:\?', script), flag
        assert "WORLD_SIZE" not in script and "$RANK" not in script  # processes and node rank, not torchrun's
    claims = {
        o["metadata"]["name"]: o["spec"]["accessModes"]
        for o in renders["training"]
        if o["kind"] == "PersistentVolumeClaim"
    }
    assert claims == {"alexnet-prepared": ["ReadOnlyMany"], "alexnet-training-run": ["ReadWriteMany"]}


def torchrun_launch(script: str) -> tuple[dict[str, str], str]:
    """The torchrun flags a job's shell script passes (flag → the variable it reads) and what it runs."""
    flags = dict(re.findall(r'--([a-z-]+)="\$\{([A-Z_]+):\?', script))
    return flags, script.split("--max-restarts=0", 1)[1]


def test_trainjob_runs_the_pytorchjob_pod(renders):
    """The TrainJob is the PyTorchJob for Kubeflow Trainer v2: on its runtime (shipped beside it, the torch
    plugin's shape), the pod the Trainer makes is the PyTorchJob's pod, with the same command, flags,
    environment, resources, image and claims; 2 nodes × 2 processes."""
    objects = renders["trainjob"]
    job, runtime = by_kind(objects, "TrainJob"), by_kind(objects, "TrainingRuntime")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}  # fmt: skip
    assert runtime["spec"]["mlPolicy"]["torch"] == {}  # the plugin that sets PET_* and the port
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 2)
    (jobset_job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert jobset_job["name"] == "node" and jobset_job["replicas"] == 1
    assert jobset_job["template"]["spec"]["backoffLimit"] == 0  # a failure restarts the whole JobSet
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == 6  # the PyTorchJob's backoffLimit

    pytorchjob = by_kind(renders["training"], "PyTorchJob")
    master = copy.deepcopy(pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    made = copy.deepcopy(trainer_pod(job, objects)["template"])
    assert made["spec"].pop("restartPolicy") == "Never"
    (theirs,), (ours,) = master["spec"]["containers"], made["spec"]["containers"]
    assert (theirs.pop("name"), ours.pop("name")) == ("pytorch", "node")
    assert [p["containerPort"] for p in ours.pop("ports")] == [TRAINER_MASTER_PORT]
    theirs.pop("ports")
    # The same torchrun flags from the same PET_* variables, and the same command under torchrun.
    script, their_script = ours["command"].pop(2), theirs["command"].pop(2)
    assert torchrun_launch(script) == torchrun_launch(their_script)
    assert set(torchrun_launch(script)[0].values()) == {
        "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}  # fmt: skip
    env = {e["name"]: e.get("value") for e in ours.pop("env")}
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "2"
    assert {k: v for k, v in env.items() if not k.startswith("PET_")} == {
        e["name"]: e["value"] for e in theirs.pop("env")}  # fmt: skip
    assert ours["image"] == "alexnet-train:latest"
    assert made == master  # everything else: image, args, resources, volumes, security, placement, labels
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim"] == [
        o for o in renders["training"] if o["kind"] == "PersistentVolumeClaim"]  # fmt: skip
    # The runtime's own image is the job's, so that one `kustomize edit set image` sets both.
    (runtime_container,) = jobset_job["template"]["spec"]["template"]["spec"]["containers"]
    assert runtime_container["image"] == trainer["image"]


def operator_environment(job: dict, replica: str, index: int, master_port: int) -> dict[str, str]:
    """The variables the training operator (v1.7+, no elasticPolicy) sets in a replica's container
    (pkg/controller.v1/pytorch/envvar.go, master.go), for a Master reachable at 127.0.0.1."""
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(r["replicas"] for r in replicas.values())
    nproc = job["spec"]["nprocPerNode"]
    rank = index + (1 if replica == "Worker" else 0)
    return {
        "MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port), "PET_MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(nodes * int(nproc)), "RANK": str(rank), "PET_NODE_RANK": str(rank),
        "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": nproc, "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def trainer_environment(job: dict, objects: list[dict], index: int, master_port: int) -> dict[str, str]:
    """The PET_* variables Kubeflow Trainer's torch plugin sets in the TrainJob's pod with completion index
    `index` (trainer_pod), for a node 0 reachable at 127.0.0.1."""
    (container,) = trainer_pod(job, objects)["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return {"PET_NNODES": env["PET_NNODES"], "PET_NPROC_PER_NODE": env["PET_NPROC_PER_NODE"],
            "PET_NODE_RANK": str(index), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(master_port),
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_job_command_trains_and_resumes_as_its_operator_runs_it(renders, tmp_path, kind):
    """The container's command, as written, on two "nodes" (two copies here, one per pod) with the
    environment the training operator (PyTorchJob) or Kubeflow Trainer (TrainJob) gives each pod: 2 × 2
    processes on the CPU (gloo), then rerun after the first run finished, when the run folder holds a state:
    the command adds --resume and the run continues."""
    if kind == "PyTorchJob":
        job = by_kind(renders["training"], "PyTorchJob")
        (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        pod_environments = lambda port: [operator_environment(job, "Master", 0, port),
                                         operator_environment(job, "Worker", 0, port)]  # fmt: skip
    else:
        job = by_kind(renders["trainjob"], "TrainJob")
        (container,) = trainer_pod(job, renders["trainjob"])["template"]["spec"]["containers"]
        nodes = job["spec"]["trainer"]["numNodes"]
        pod_environments = lambda port: [
            trainer_environment(job, renders["trainjob"], node, port) for node in range(nodes)
        ]
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    prepare_quietly(make_source(tmp_path / "src", classes=2, train=4, val=2), prepared)
    run.mkdir()
    script = container["command"][2].replace("/data", str(prepared)).replace("/checkpoints", str(run))
    assert script.count(str(prepared)) == 1 and script.count(str(run)) == 2
    # The manifest's flags, then the ones that make it a tiny CPU run (argparse: the last one wins).
    tiny = ["--devices", "cpu", "--workers", "0", "--width", "0.0625", "--batch-size", "4", "--dropout", "0"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # torchrun, python: the project's

    def run_pods(epochs: int) -> list[str]:
        port = free_port()
        argv = [
            *container["command"][:2],
            script,
            *container["command"][3:],
            *container["args"],
            *tiny,
            "--epochs",
            str(epochs),
        ]
        pods = []
        with contextlib.ExitStack() as stack:
            for node, pod_environment in enumerate(pod_environments(port)):
                env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"} | pod_environment
                log = stack.enter_context(open(tmp_path / f"node{node}-{epochs}.log", "w"))
                pod = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
                stack.callback(pod.kill)  # a no-op once it has exited; on a failed assertion, no orphans
                pods.append((pod, Path(log.name)))
            for pod, _ in pods:
                pod.wait(timeout=600)
        logs = [log.read_text() for _, log in pods]
        for (pod, _), log in zip(pods, logs):
            assert pod.returncode == 0, log[-4000:]
        return logs

    master_log, _ = run_pods(epochs=1)
    assert "4 process(es)" in master_log  # 2 nodes × 2 processes
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    master_log, _ = run_pods(epochs=2)
    assert "resuming" in master_log
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def checkov() -> Path:
    """checkov, pinned, in its own virtual environment (its dependencies would clash with the project's):
    created on first use; a skip only when the package index cannot be reached."""
    executable = CHECKOV_VENV / "bin" / "checkov"
    marker = CHECKOV_VENV / f".installed-{CHECKOV_VERSION}"
    if marker.exists() and executable.exists():
        return executable
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(CHECKOV_VENV)], check=True, timeout=120)
    result = subprocess.run(
        [str(CHECKOV_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"checkov=={CHECKOV_VERSION}"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        unreachable = r"NewConnectionError|Name or service not known|Temporary failure in name resolution|" \
                      r"Network is unreachable|Connection refused|timed out|Max retries exceeded|ProxyError"  # fmt: skip
        if re.search(unreachable, result.stdout + result.stderr):
            pytest.skip(f"cannot install checkov: the package index is unreachable ({result.stderr.strip()[-300:]})")
        pytest.fail(f"pip install checkov=={CHECKOV_VERSION} failed:\n{result.stderr[-4000:]}")
    marker.write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    return executable


def test_checkov_skips_say_why():
    lines = (DEPLOY / "checkov.yaml").read_text().splitlines()
    start = lines.index("skip-check:")
    skips = [line for line in lines[start + 1 :] if line.startswith("  - ")]
    assert skips and all(re.fullmatch(r"  - CKV2?_K8S_\d+  # \S.{20,}", line) for line in skips), skips


@pytest.mark.slow
def test_checkov_finds_nothing_unexpected(renders, tmp_path):
    executable = checkov()
    scanned = set()
    for name, objects in renders.items():
        pods = [as_pod(p) for p in pods_of(objects)]
        (tmp_path / f"{name.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(objects + pods))
        scanned |= {f"{o['kind']}.{o['metadata']['name']}" for o in objects + pods}
    for pod in [as_pod(p) for name in ("training", "trainjob") for p in pods_of(renders[name])]:
        for key, value in pod["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                assert re.fullmatch(r"CKV2?_K8S_\d+=\S.{20,}", value), value  # each annotated skip says why
    result = subprocess.run(
        [str(executable), "--config-file", str(DEPLOY / "checkov.yaml"), "-d", str(tmp_path), "-o", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-4000:]
    report = json.loads(result.stdout)
    report = report if isinstance(report, dict) else next(r for r in report if r["check_type"] == "kubernetes")
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in report["results"]["failed_checks"]]
    assert failed == [] and result.returncode == 0, "\n".join(failed)
    checked = {".".join(c["resource"].split(".")[::2][:2]) for c in report["results"]["passed_checks"]}
    # checkov's resource ids are KIND.NAMESPACE.NAME: every Deployment and pod was looked at
    for resource in ("Deployment.alexnet-api", "Pod.alexnet-predictor", "Pod.alexnet-train-master",
                     "Pod.alexnet-train-node"):  # fmt: skip
        assert resource in checked and resource in scanned, (resource, sorted(checked))
