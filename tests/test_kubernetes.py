"""deploy/kubernetes/ (README, "Running on Kubernetes"): the kustomize base renders, every built-in object
passes the Kubernetes schema (kubernetes-validate, offline: it bundles the schemas), the API's pod runs as the
image's unprivileged user with the settings docker-compose gives it, and every series that the HPA, the
prometheus-adapter rule and the Grafana dashboard read is one the service's /metrics exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from test_service_support import ServiceProcess, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "deploy" / "kubernetes" / "base"
BUILT_IN_GROUPS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomization (`kubectl kustomize`)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every series name /metrics exports (from its # TYPE lines, so series with no samples yet count too;
    a histogram as its _bucket, _sum and _count series)."""
    directory = tmp_path_factory.mktemp("kubernetes")
    checkpoint = write_checkpoint(directory / "small.safetensors", seed=5, width=0.0625)
    service = ServiceProcess(directory / "service.log", "--checkpoint", str(checkpoint), "--device", "cpu")
    try:
        service.wait_ready()
        text = httpx.get(service.url + "/metrics", timeout=10).text
    finally:
        service.stop()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    assert "alexnet_queue_depth" in names and "alexnet_http_request_duration_seconds_bucket" in names
    assert 'alexnet_queue_depth{kind="admitted"}' in text
    return names


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


def test_built_in_objects_pass_the_kubernetes_schema(rendered):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (dev extra)"
    )
    version = kubernetes_validate.utils.latest_version()
    for obj in rendered:
        if obj["apiVersion"] in BUILT_IN_GROUPS:  # CRDs (ServiceMonitor) have no bundled schema
            kubernetes_validate.validate(obj, version, strict=True)


def test_pod_is_unprivileged_and_sized_as_in_compose(rendered):
    deployment = by_kind(rendered, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["image"].split(":")[0] == "alexnet-api"
    assert container["command"] == ["python", "-m", "service"]
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    security = container["securityContext"]
    assert security["runAsUser"] == 10001 and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"

    env = {e["name"]: e["value"] for e in container["env"]}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]
    default = lambda value: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
    assert env == {"ALEXNET_HOST": "0.0.0.0", "ALEXNET_PORT": "8000"} | {
        k: default(v) for k, v in compose["environment"].items()
    }
    limits = compose["deploy"]["resources"]["limits"]
    assert default(limits["cpus"]) == "2" and default(limits["memory"]) == "3g"
    assert container["resources"]["limits"] == container["resources"]["requests"] == {"cpu": "2", "memory": "3Gi"}

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
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
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
