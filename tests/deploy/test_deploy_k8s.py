"""Kubernetes manifests: every kustomization builds and validates strictly against the Kubernetes schemas,
and the built objects keep the server's contract (port, probes, drain, security, scaling, GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from lmservice.metrics import Metrics
from tests.deploy.deploy_support import (
    K8S,
    K8S_VERSIONS,
    SCRAPE_TARGET_LABELS,
    find,
    kubernetes_validate,
    kustomizations,
    kustomize_build,
    load_yaml,
)

SERVICEMONITOR_SCHEMA = json.loads((Path(__file__).parent / "schemas/servicemonitor-monitoring-v1.json").read_text())
PROMETHEUSRULE_SCHEMA = json.loads((Path(__file__).parent / "schemas/prometheusrule-monitoring-v1.json").read_text())
# The Prometheus Operator's CRDs: kubernetes-validate has no schema for them; this repository's strict subset
# schemas instead.
CRD_SCHEMAS = {"ServiceMonitor": SERVICEMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}
SERVING = {"cpu": K8S / "overlays/cpu", "gpu": K8S / "overlays/gpu"}
FINETUNE = {"cpu": K8S / "overlays/cpu/finetune", "gpu": K8S / "overlays/gpu/finetune"}


def _id(path: Path) -> str:
    return str(path.relative_to(K8S))


@pytest.mark.parametrize("directory", kustomizations(), ids=_id)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builds_and_validates_strictly(directory: Path, version: str) -> None:
    validator = kubernetes_validate()
    resources = kustomize_build(directory)
    assert resources, f"{directory} builds to nothing"
    for resource in resources:
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        if resource["apiVersion"] == "monitoring.coreos.com/v1":
            jsonschema.validate(resource, CRD_SCHEMAS[resource["kind"]])
            continue
        try:
            validator.validate(resource, version, strict=True)
        except validator.ValidationError as error:
            pytest.fail(f"{_id(directory)}: {name} is invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, error.path))}: {error.message}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validator really is strict: a misspelt field fails."""
    validator = kubernetes_validate()
    deployment = json.loads(json.dumps(find(kustomize_build(SERVING["cpu"]), "Deployment")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, K8S_VERSIONS[-1], strict=True)
    monitor = json.loads(json.dumps(find(kustomize_build(SERVING["cpu"]), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICEMONITOR_SCHEMA)
    rule = json.loads(json.dumps(find(kustomize_build(SERVING["cpu"]), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUSRULE_SCHEMA)


def _server(overlay: str) -> tuple[dict, dict, dict]:
    """(Deployment, its lmservice container, ConfigMap data) of a serving overlay."""
    resources = kustomize_build(SERVING[overlay])
    deployment = find(resources, "Deployment", "lmservice")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "lmservice")
    return deployment, container, find(resources, "ConfigMap")["data"]


@pytest.mark.parametrize("overlay", SERVING)
def test_probes_use_the_servers_endpoints_and_port(overlay: str) -> None:
    _, container, config = _server(overlay)
    port = container["ports"][0]
    assert port["containerPort"] == int(config["LMSERVICE_PORT"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert config["LMSERVICE_HOST"] == "0.0.0.0"
    assert container["envFrom"][0]["configMapRef"]["name"] == find(kustomize_build(SERVING[overlay]),
                                                                   "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize("overlay", SERVING)
def test_grace_period_covers_the_drain(overlay: str) -> None:
    deployment, container, config = _server(overlay)
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config["LMSERVICE_DRAIN_TIMEOUT_S"])
    # The pod leaves the endpoints during preStop, then drains; the kubelet kills it at the grace period.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize("directory", [*SERVING.values(), *FINETUNE.values()], ids=_id)
def test_pods_are_locked_down(directory: Path) -> None:
    for workload in (r for r in kustomize_build(directory) if r["kind"] in ("Deployment", "Job")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        # Services named lmservice* would otherwise inject LMSERVICE_PORT=tcp://... into the container.
        assert pod["enableServiceLinks"] is False
        mounts_by_volume = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            writable = {m["mountPath"] for m in container["volumeMounts"]
                        if "emptyDir" in mounts_by_volume[m["name"]]}
            assert {"/tmp", "/cache"} <= writable, "caches and scratch need a writable mount"
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert ":" in container["image"] and not container["image"].endswith(":latest")


def test_gpu_overlays_request_a_gpu_and_cuda() -> None:
    _, container, config = _server("gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert config["LMSERVICE_DEVICE"] == "cuda"
    job = find(kustomize_build(FINETUNE["gpu"]), "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _, cpu_container, cpu_config = _server("cpu")
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert cpu_config["LMSERVICE_DEVICE"] == "cpu"
    assert container["image"].split(":")[1] != cpu_container["image"].split(":")[1]


@pytest.mark.parametrize("overlay", SERVING)
def test_selectors_match_the_server_pods(overlay: str) -> None:
    resources = kustomize_build(SERVING[overlay])
    deployment, container, _ = _server(overlay)
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    service = find(resources, "Service", "lmservice")
    assert selects(service["spec"]["selector"])
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert selects(find(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    policy = find(resources, "NetworkPolicy", "lmservice")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == container["ports"][0]["name"]
    monitor = find(resources, "ServiceMonitor")
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = find(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The HPA owns the replica count.
    assert "replicas" not in deployment["spec"]


def _label_names(metrics: Metrics) -> set[str]:
    return {name for collector in vars(metrics).values() for name in getattr(collector, "_labelnames", ())}


def test_scraping_keeps_the_servers_own_labels() -> None:
    """A metric label that is also a target label of the Prometheus Operator survives only with honorLabels."""
    clash = _label_names(Metrics()) & SCRAPE_TARGET_LABELS
    monitor = find(kustomize_build(SERVING["cpu"]), "ServiceMonitor")
    if clash:
        assert monitor["spec"]["endpoints"][0].get("honorLabels") is True, f"labels {clash} would be renamed"


@pytest.mark.parametrize("overlay", SERVING)
def test_autoscaler_uses_the_adapters_metric_with_a_cpu_fallback(overlay: str) -> None:
    hpa = find(kustomize_build(SERVING[overlay]), "HorizontalPodAutoscaler")
    rules = load_yaml(K8S / "prometheus-adapter/config.yaml")["rules"]
    served = {rule["name"]["as"] for rule in rules}
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Pods"]["pods"]["metric"]["name"] in served
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_finetune_job_runs_torchrun_across_its_indexed_pods() -> None:
    for directory in FINETUNE.values():
        resources = kustomize_build(directory)
        job = find(resources, "Job")
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"]
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        args = container["args"]
        assert container["command"] == ["torchrun"]
        assert f"--nnodes={spec['completions']}" in args
        assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args
        assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in container["env"])
        # Rank 0's stable DNS name goes through the headless Service named by the pod's subdomain.
        headless = find(resources, "Service", pod["subdomain"])
        assert headless["spec"]["clusterIP"] == "None"
        assert f"--master-addr={job['metadata']['name']}-0.{pod['subdomain']}" in args
        assert args[args.index("--module") + 1:args.index("--module") + 3] == ["lmservice.cli", "train"]
        # The adapter goes to the PVC that the servers read their adapters from.
        output = args[args.index("--output") + 1]
        adapters_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/adapters")
        assert output.startswith("/adapters/") and not adapters_mount.get("readOnly")
        _, server, config = _server("cpu")
        server_mount = next(m for m in server["volumeMounts"] if m["mountPath"] == config["LMSERVICE_ADAPTERS_DIR"])
        assert server_mount["subPath"] == adapters_mount["subPath"] and server_mount["readOnly"] is True
        claim = {v["name"]: v for v in pod["volumes"]}[adapters_mount["name"]]["persistentVolumeClaim"]["claimName"]
        pvc = find(kustomize_build(SERVING["cpu"]), "PersistentVolumeClaim", claim)
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_every_kustomization_is_checked() -> None:
    """New overlays are picked up by the build test; none is left out of deploy/k8s."""
    built = {_id(d) for d in kustomizations()}
    assert {"base", "finetune", "overlays/cpu", "overlays/gpu", "overlays/cpu/finetune", "overlays/gpu/finetune",
            "prometheus-adapter"} <= built
