"""deploy/k8s: validated statically (no cluster here).

Every manifest against the Kubernetes 1.30 JSON schemas shipped in the PyPI package
kubernetes-validate (strict: unknown fields are errors); the containers' environment and
ConfigMaps against the settings classes; commands against the entry points; probes,
Services, the autoscaler and the NATS cluster against each other; the NATS config with a
real ``nats-server -t``. Broken copies show the checks catch faults.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy_support import (
    COMPOSE_DIR,
    K8S_DIR,
    ROOT,
    USERS,
    check_command,
    check_env,
    check_required,
    load_yaml,
    load_yaml_all,
    nats_binary,
    password_var,
    service_for_image,
)

K8S_VERSION = "1.30"


def kustomization() -> dict[str, Any]:
    doc = load_yaml(K8S_DIR / "kustomization.yaml")
    assert isinstance(doc, dict)
    return doc


def manifests() -> list[dict[str, Any]]:
    return [d for f in kustomization()["resources"] for d in load_yaml_all(K8S_DIR / f)]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def schema_errors(docs: list[dict[str, Any]]) -> list[str]:
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    return errors


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert kustomization()["namespace"] == "fedgate"
    images = {i["name"] for i in kustomization()["images"]}
    used = {c["image"] for _, c in containers(manifests()) if service_for_image(c["image"])}
    assert used == images


def test_manifests_match_the_kubernetes_schemas() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "StatefulSet",
        "Deployment",
        "DaemonSet",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Service",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
    }
    assert schema_errors(docs) == []


def test_the_schema_check_catches_mistakes() -> None:
    docs = manifests()
    bad = copy.deepcopy(by_kind(docs, "Deployment", "gateway"))
    bad["spec"]["replica"] = 3
    assert schema_errors([bad])
    bad = copy.deepcopy(by_kind(docs, "StatefulSet", "nats"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "4222"
    assert schema_errors([bad])
    bad = copy.deepcopy(by_kind(docs, "DaemonSet", "edge"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    assert schema_errors([bad])


# -- containers: settings, commands, mounts ------------------------------------------------
def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    out = []
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            for c in spec.get("initContainers", []) + spec["containers"]:
                out.append((doc, c))
    return out


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            env |= by_kind(docs, "ConfigMap", ref["name"])["data"]
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", "<from field>")
    return env


def check_containers(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc, c in containers(docs):
        service = service_for_image(c["image"])
        if service is None:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
        if c["command"][0] == "install":  # copies secrets into place (see trainer.yaml)
            continue
        env = container_env(docs, c)
        problems += check_env(service, env, where=where)
        problems += check_required(service, env, where=where)
        problems += check_command(service, c["command"])
    return problems


def test_every_variable_and_command_exists_in_the_services() -> None:
    assert check_containers(manifests()) == []


def test_the_settings_check_catches_mistakes() -> None:
    docs = manifests()
    by_kind(docs, "ConfigMap", "fedgate-edge-env")["data"]["FEDGATE_EDGE_GPU"] = "0"
    gateway = pod_spec(by_kind(docs, "Deployment", "gateway"))
    assert gateway is not None
    gateway["containers"][0]["env"].pop(0)
    gateway["containers"][0]["command"] = ["python", "-m", "gateway", "serve"]
    problems = "\n".join(check_containers(docs))
    assert "FEDGATE_EDGE_GPU" in problems
    assert "FEDGATE_GATEWAY_API_KEYS_FILE" not in problems  # optional: removing it is allowed
    assert "'serve'" in problems


def mount_paths(spec: dict[str, Any], c: dict[str, Any]) -> set[str]:
    return {m["mountPath"] for m in c.get("volumeMounts", [])}


def test_every_file_setting_is_mounted_or_installed() -> None:
    docs = manifests()
    for doc, c in containers(docs):
        spec = pod_spec(doc)
        assert spec is not None
        if not service_for_image(c["image"]) or c["command"][0] == "install":
            continue
        installed = {
            Path(p).name
            for init in spec.get("initContainers", [])
            if init["command"][0] == "install"
            for p in init["command"][5:]
        }
        mounts = mount_paths(spec, c)
        for key, value in container_env(docs, c).items():
            if not key.endswith(("_FILE", "_DIR")):
                continue
            assert any(value == m or value.startswith(m + "/") for m in mounts), (key, value)
            if value.startswith("/run/fedgate/") and doc["kind"] != "DaemonSet":
                assert Path(value).name in installed, f"{key}: no init container installs it"


def test_secret_copies_are_private() -> None:
    for doc, c in containers(manifests()):
        if c.get("command", [""])[0] == "install":
            assert c["command"][1:5] == ["-m", "0600", "-t", "/run/fedgate"], doc["metadata"]
            spec = pod_spec(doc)
            assert spec is not None
            (vol,) = [v for v in spec["volumes"] if v["name"] == "secrets"]
            assert vol["emptyDir"]["medium"] == "Memory"
            assert spec["securityContext"]["runAsUser"] == 10001


def test_secrets_and_config_maps_exist_or_are_documented() -> None:
    docs = manifests()
    defined = {d["metadata"]["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    guide = (ROOT / "docs" / "deploy.md").read_text()
    referenced: set[str] = set()
    text = "\n".join((K8S_DIR / f).read_text() for f in kustomization()["resources"])
    referenced |= set(re.findall(r"secretName: ([\w-]+)", text))
    referenced |= set(re.findall(r"(?:secret|configMap): \{name: ([\w-]+)", text))
    referenced |= set(re.findall(r"(?:secretRef|configMapRef): \{name: ([\w-]+)", text))
    referenced |= set(re.findall(r"- secret:\n\s+name: ([\w-]+)", text))
    referenced |= set(re.findall(r"secret:\s*\n\s+name: ([\w-]+)", text))
    assert {"fedgate-nats-passwords", "fedgate-gateway-tls", "fedgate-public"} <= referenced
    for name in referenced - defined:
        assert f"`{name}`" in guide, f"{name} is neither defined nor documented in docs/deploy.md"


# -- probes, services, scaling, GPUs, NATS cluster -----------------------------------------
def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(p)


def test_probes_use_the_real_health_endpoints() -> None:
    docs = manifests()
    gw = pod_spec(by_kind(docs, "Deployment", "gateway"))
    edge = pod_spec(by_kind(docs, "DaemonSet", "edge"))
    assert gw is not None and edge is not None
    gc, ec = gw["containers"][0], edge["containers"][0]
    genv, eenv = container_env(docs, gc), container_env(docs, ec)
    assert gc["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"  # not the edges
    assert gc["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert port_number(gc, gc["readinessProbe"]["httpGet"]["port"]) == int(
        genv["FEDGATE_GATEWAY_PORT"]
    )
    assert ec["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert port_number(ec, ec["readinessProbe"]["httpGet"]["port"]) == int(
        eenv["FEDGATE_EDGE_TRITON_HTTP_PORT"]
    )
    ports = {p["name"]: p["containerPort"] for p in ec["ports"]}
    assert ports == {
        "triton-http": int(eenv["FEDGATE_EDGE_TRITON_HTTP_PORT"]),
        "triton-grpc": int(eenv["FEDGATE_EDGE_TRITON_GRPC_PORT"]),
        "triton-metrics": int(eenv["FEDGATE_EDGE_TRITON_METRICS_PORT"]),
        "edge-metrics": int(eenv["FEDGATE_EDGE_METRICS_PORT"]),
    }
    nats = pod_spec(by_kind(docs, "StatefulSet", "nats"))
    assert nats is not None
    nc = nats["containers"][0]
    conf = by_kind(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    monitor = int(re.search(r"^http: [\d.]+:(\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = nc[probe]["httpGet"]
        assert get["path"].startswith("/healthz") and port_number(nc, get["port"]) == monitor


def test_services_target_real_ports_and_the_autoscaler_its_deployment() -> None:
    docs = manifests()
    for svc in [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] != "trainer"]:
        selector = svc["spec"]["selector"]
        (workload,) = [
            d
            for d in docs
            if pod_spec(d) is not None
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        spec = pod_spec(workload)
        assert spec is not None
        names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert by_kind(docs, target["kind"], target["name"])["apiVersion"] == target["apiVersion"]
    gw = pod_spec(by_kind(docs, "Deployment", "gateway"))
    assert gw is not None and gw["containers"][0]["resources"]["requests"]["cpu"]
    ingress = by_kind(docs, "Ingress", "gateway")
    assert ingress["spec"]["tls"][0]["secretName"] == "fedgate-gateway-tls"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "gateway"


def test_edges_run_on_gpu_nodes_and_trainer_is_a_statefulset() -> None:
    docs = manifests()
    edge = pod_spec(by_kind(docs, "DaemonSet", "edge"))
    assert edge is not None
    assert edge["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert edge["nodeSelector"] == {"fedgate.io/edge": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in edge["tolerations"])
    env = container_env(docs, edge["containers"][0])
    assert env["FEDGATE_EDGE_INSTANCE_KIND"] == "KIND_GPU"
    trainer = by_kind(docs, "StatefulSet", "trainer")
    assert trainer["spec"]["replicas"] == 1


def test_nats_is_a_three_node_jetstream_cluster() -> None:
    docs = manifests()
    sts = by_kind(docs, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3
    conf = by_kind(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    routes = re.findall(r"nats://([\w-]+)\.([\w-]+):6222", conf)
    assert routes == [(f"nats-{i}", sts["spec"]["serviceName"]) for i in range(3)]
    assert "jetstream" in conf and "verify: true" in conf
    assert by_kind(docs, "PodDisruptionBudget", "nats")["spec"]["minAvailable"] == 2
    accounts = by_kind(docs, "ConfigMap", "nats-config")["data"]["accounts.conf"]
    assert accounts == (COMPOSE_DIR / "nats" / "accounts.conf").read_text()


def test_the_cluster_config_is_valid_for_nats_server(tmp_path: Path) -> None:
    data = by_kind(manifests(), "ConfigMap", "nats-config")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text.replace("/etc/nats-tls/", f"{tmp_path}/tls/"))
    from fedgate.tls_cmd import TlsPlan, create_tls

    create_tls(TlsPlan(tmp_path / "tls", ()))
    env = dict(os.environ) | {password_var(u): "x" for u in USERS} | {"POD_NAME": "nats-0"}
    result = subprocess.run(
        [nats_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet"])
def test_pods_are_hardened(kind: str) -> None:
    for doc in manifests():
        spec = pod_spec(doc)
        if doc["kind"] != kind or spec is None:
            continue
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
