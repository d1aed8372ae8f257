"""Deployments that work as shipped (issue #17, findings 2-7 and 10), checked with the real
tools where this machine has them (``docker compose config`` from the docker-compose wheel,
``kubectl kustomize``, hadolint) and statically elsewhere: released versions reach the
gateway, telemetry is scraped, edges get valid ids and only the signed versions, gateway
readiness ignores the edges, every workload has probes. Each check runs on a broken copy
too, to show it catches the fault.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy_support import COMPOSE_DIR, K8S_DIR, ROOT, load_yaml
from tests.test_deploy_compose import example_env
from tests.test_deploy_k8s import by_kind, container_env, manifests, pod_spec

BIN = Path(sys.executable).parent
GUIDE = ROOT / "docs" / "deploy.md"


# -- compose, as docker compose renders it -------------------------------------------------
def rendered(tmp_path: Path, cpu: bool = False) -> dict[str, Any]:
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in example_env().items()))
    files = ["-f", "compose.yaml"] + (["-f", "compose.cpu.yaml"] if cpu else [])
    out = subprocess.run(
        [
            str(BIN / "docker-compose"),
            "--env-file",
            str(env_file),
            *files,
            "config",
            "--format",
            "json",
        ],
        cwd=COMPOSE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu-override"])
def test_docker_compose_renders_the_files(tmp_path: Path, cpu: bool) -> None:
    doc = rendered(tmp_path, cpu)
    assert {"nats", "trainer", "edge-1", "edge-2", "gateway", "ingress"} <= set(doc["services"])


def check_rollouts(doc: dict[str, Any]) -> list[str]:
    """The trainer calls the gateway's rollout API with an admin key it has."""
    services = doc["services"]
    env = services["trainer"].get("environment", {})
    url, key_file = (
        env.get("FEDGATE_TRAINER_GATEWAY_URL"),
        env.get("FEDGATE_TRAINER_ADMIN_KEY_FILE"),
    )
    if not url or not key_file:
        return ["trainer: GATEWAY_URL and ADMIN_KEY_FILE must both be set"]
    parts = urlsplit(url)
    problems = []
    gateway_port = int(services["gateway"]["environment"]["FEDGATE_GATEWAY_PORT"])
    if (parts.hostname, parts.port) != ("gateway", gateway_port):
        problems.append(f"trainer: {url} is not the gateway (gateway:{gateway_port})")
    if not set(services["trainer"]["networks"]) & set(services["gateway"]["networks"]):
        problems.append("trainer and gateway share no network")
    secrets = {s["target"]: s["source"] for s in services["trainer"].get("secrets", [])}
    targets = {t if t.startswith("/") else f"/run/secrets/{t}": s for t, s in secrets.items()}
    if key_file not in targets:
        problems.append(f"trainer: no secret is mounted at {key_file}")
    return problems


def test_released_versions_are_rolled_out_in_compose(tmp_path: Path) -> None:
    doc = rendered(tmp_path)
    assert check_rollouts(doc) == []
    source = {s["target"]: s["source"] for s in doc["services"]["trainer"]["secrets"]}
    secret = load_yaml(COMPOSE_DIR / "compose.yaml")["secrets"][source["gateway-admin-key"]]
    assert secret["environment"] in example_env()
    guide = GUIDE.read_text()
    assert "admin:trainer:" in guide and secret["environment"] in guide
    broken = copy.deepcopy(doc)
    del broken["services"]["trainer"]["environment"]["FEDGATE_TRAINER_ADMIN_KEY_FILE"]
    assert check_rollouts(broken)
    broken = copy.deepcopy(doc)
    broken["services"]["trainer"]["environment"]["FEDGATE_TRAINER_GATEWAY_URL"] = "http://x:1"
    assert check_rollouts(broken)


def check_edge_volumes(doc: dict[str, Any]) -> list[str]:
    """Edges mount their own data and, read-only, only the trainer's artifacts volume."""
    services = doc["services"]
    trainer = services["trainer"]
    data_dir = trainer["environment"]["FEDGATE_TRAINER_DATA_DIR"]
    by_target = {v["target"]: v["source"] for v in trainer["volumes"]}
    artifacts = by_target.get(f"{data_dir}/artifacts")
    problems = [] if artifacts else ["trainer: the artifacts directory is not a volume of its own"]
    trainer_volumes = set(by_target.values())
    for name, svc in services.items():
        if not svc.get("image", "").startswith("fedgate-edge"):
            continue
        seed = svc["environment"]["FEDGATE_EDGE_SEED_ARTIFACTS_DIR"]
        for vol in svc.get("volumes", []):
            if vol["source"] not in trainer_volumes:
                continue
            if vol["source"] != artifacts:
                problems.append(f"{name}: mounts the trainer's {vol['source']} (its state)")
            elif not vol.get("read_only") or vol["target"] != seed:
                problems.append(f"{name}: artifacts must be read-only at {seed}")
    return problems


def test_edges_mount_only_the_signed_versions(tmp_path: Path) -> None:
    doc = rendered(tmp_path)
    assert check_edge_volumes(doc) == []
    broken = copy.deepcopy(doc)
    broken["services"]["edge-2"]["volumes"].append(
        {"type": "volume", "source": "trainer-data", "target": "/t", "read_only": True}
    )
    assert check_edge_volumes(broken) == ["edge-2: mounts the trainer's trainer-data (its state)"]


def test_haproxy_resolves_the_gateway_while_running() -> None:
    cfg = (COMPOSE_DIR / "haproxy" / "haproxy.cfg").read_text()
    resolvers = re.findall(r"^resolvers (\S+)$", cfg, re.M)
    (server,) = re.findall(r"^\s+server-template gateway .*$", cfg, re.M)
    assert resolvers and re.search(rf"\bresolvers ({'|'.join(resolvers)})\b", server)
    assert "init-addr none" in server  # starts while the gateway is not resolvable yet
    assert re.search(r"^\s+(parse-resolv-conf|nameserver \S+ \S+)$", cfg, re.M)
    assert "option httpchk GET /v1/health/ready" in cfg


@pytest.mark.parametrize("name", ["gateway", "trainer", "edge"])
def test_hadolint_passes(name: str) -> None:
    out = subprocess.run(
        [str(BIN / "hadolint"), str(COMPOSE_DIR / f"Dockerfile.{name}")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- Kubernetes --------------------------------------------------------------------------
def test_kubectl_kustomize_renders_every_manifest() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert names == {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"fedgate"}


def main_container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec = pod_spec(by_kind(docs, kind, name))
    assert spec is not None
    container: dict[str, Any] = spec["containers"][0]
    return container


def admits(docs: list[dict[str, Any]], target: str, labels: dict[str, str], port: int) -> bool:
    """Some NetworkPolicy of the pods named ``target`` admits pods with ``labels``."""
    for pol in [d for d in docs if d["kind"] == "NetworkPolicy"]:
        if pol["spec"]["podSelector"].get("matchLabels") != {"app.kubernetes.io/name": target}:
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            for peer in rule.get("from", []):
                sel = peer.get("podSelector", {}).get("matchLabels")
                if sel is not None and sel.items() <= labels.items() and port in ports:
                    return True
    return False


def admits_monitoring(docs: list[dict[str, Any]], target: str, port: int) -> bool:
    for pol in [d for d in docs if d["kind"] == "NetworkPolicy"]:
        if pol["spec"]["podSelector"].get("matchLabels") != {"app.kubernetes.io/name": target}:
            continue
        for rule in pol["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
                if ns.get("kubernetes.io/metadata.name") == "monitoring" and port in {
                    p["port"] for p in rule.get("ports", [])
                }:
                    return True
    return False


def check_k8s_rollouts(docs: list[dict[str, Any]]) -> list[str]:
    trainer = main_container(docs, "StatefulSet", "trainer")
    env = container_env(docs, trainer)
    url, key_file = (
        env.get("FEDGATE_TRAINER_GATEWAY_URL"),
        env.get("FEDGATE_TRAINER_ADMIN_KEY_FILE"),
    )
    if not url or not key_file:
        return ["trainer: GATEWAY_URL and ADMIN_KEY_FILE must both be set"]
    parts = urlsplit(url)
    svc = by_kind(docs, "Service", "gateway")
    problems = []
    if (parts.hostname, parts.port) != ("gateway", svc["spec"]["ports"][0]["port"]):
        problems.append(f"trainer: {url} is not the gateway Service")
    spec = pod_spec(by_kind(docs, "StatefulSet", "trainer"))
    assert spec is not None
    installed = {Path(p).name for i in spec["initContainers"] for p in i["command"][5:]}
    if Path(key_file).name not in installed:
        problems.append(f"trainer: nothing installs {key_file}")
    labels = by_kind(docs, "StatefulSet", "trainer")["spec"]["template"]["metadata"]["labels"]
    gw_port = main_container(docs, "Deployment", "gateway")["ports"][0]["containerPort"]
    if not admits(docs, "gateway", labels, gw_port):
        problems.append("no NetworkPolicy admits the trainer to the gateway")
    return problems


def test_released_versions_are_rolled_out_on_kubernetes() -> None:
    docs = manifests()
    assert check_k8s_rollouts(docs) == []
    assert "`gateway-admin-key`" in GUIDE.read_text()
    broken = copy.deepcopy(docs)
    (pol,) = [
        d for d in broken if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "gateway"
    ]
    pol["spec"]["ingress"][0]["from"].pop()
    assert check_k8s_rollouts(broken) == ["no NetworkPolicy admits the trainer to the gateway"]


def test_every_workload_has_liveness_and_readiness_probes() -> None:
    for doc in manifests():
        spec = pod_spec(doc)
        if spec is None:
            continue
        main = spec["containers"][0]
        assert "livenessProbe" in main and "readinessProbe" in main, doc["metadata"]["name"]


def test_gateway_readiness_ignores_the_edges_and_the_hpa_owns_replicas() -> None:
    docs = manifests()
    gw = main_container(docs, "Deployment", "gateway")
    assert gw["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert gw["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5
    for hpa in [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]:
        target = hpa["spec"]["scaleTargetRef"]
        assert "replicas" not in by_kind(docs, target["kind"], target["name"])["spec"]


def scrape_jobs() -> dict[str, tuple[str, str]]:
    """job name -> (app label, container port name) kept by deploy/k8s/monitoring."""
    conf = load_yaml(K8S_DIR / "monitoring" / "scrape-configs.yml")
    jobs = {}
    for job in conf["scrape_configs"]:
        (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        app, port = keep["regex"].split(";")
        jobs[job["job_name"]] = (app, port)
    return jobs


def metrics_ports(docs: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(app, port name) -> port of every metrics endpoint, the gateway's HTTP port too."""
    out = {}
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        app = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for c in spec["containers"]:
            for p in c.get("ports", []):
                if p["name"].endswith("metrics") or (app, p["name"]) == ("gateway", "http"):
                    out[(app, p["name"])] = p["containerPort"]
    return out


def test_telemetry_is_served_scraped_and_admitted() -> None:
    docs = manifests()
    for kind, name, port_name in [
        ("StatefulSet", "trainer", "metrics"),
        ("DaemonSet", "edge", "edge-metrics"),
    ]:
        c = main_container(docs, kind, name)
        env = container_env(docs, c)
        prefix = "FEDGATE_TRAINER_" if name == "trainer" else "FEDGATE_EDGE_"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(env[prefix + "METRICS_PORT"]) == ports[port_name], name
        assert env[prefix + "METRICS_HOST"] in ("0.0.0.0", "<from field>"), name
    endpoints = metrics_ports(docs)
    jobs = scrape_jobs()
    assert set(jobs.values()) == set(endpoints)
    compose_jobs = {
        j["job_name"]
        for j in load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    assert set(jobs) <= compose_jobs, "the alert rules and the dashboard use compose's job names"
    for (app, _), port in endpoints.items():
        assert admits_monitoring(docs, app, port), f"monitoring cannot reach {app}:{port}"
    conf = load_yaml(K8S_DIR / "monitoring" / "scrape-configs.yml")
    (gateway_job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "gateway"]
    assert gateway_job["authorization"]["credentials_file"]
    for doc in docs:  # annotation scraping of a keyed /metrics only gets 401s
        meta = doc.get("spec", {}).get("template", {}).get("metadata", {})
        if meta.get("labels", {}).get("app.kubernetes.io/name") in ("gateway", "edge"):
            assert "prometheus.io/scrape" not in meta.get("annotations", {})


def test_fqdn_node_names_give_valid_edge_ids(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edge_runtime.settings import EdgeSettings

    docs = manifests()
    edge = main_container(docs, "DaemonSet", "edge")
    fields = {"spec.nodeName": "ip-10-0-1-2.ec2.internal", "status.podIP": "10.0.1.7"}
    env = container_env(docs, edge)
    for item in edge["env"]:
        if "valueFrom" in item:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    env["FEDGATE_EDGE_EDGE_ID_FILE"] = str(tmp_path / "edge-id")  # the node has none
    for key in [k for k in os.environ if k.startswith("FEDGATE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = EdgeSettings()  # type: ignore[call-arg]
    assert settings.edge_id == settings.nats_user == "ip-10-0-1-2-ec2-internal"
    (tmp_path / "edge-id").write_text("store-0042\n")
    assert EdgeSettings().edge_id == "store-0042"  # type: ignore[call-arg]


def test_enrolment_is_a_rolling_restart_that_brings_the_new_password() -> None:
    docs = manifests()
    nats = main_container(docs, "StatefulSet", "nats")
    # every key of the Secret becomes a variable at the next start: a new edge's too
    assert {"secretRef": {"name": "fedgate-nats-passwords"}} in nats["envFrom"]
    assert not [e for e in nats.get("env", []) if e["name"].startswith("NATS_PASSWORD_")]
    guide = GUIDE.read_text()
    assert "kubectl -n fedgate rollout restart statefulset/nats" in guide
    assert "kubectl -n fedgate rollout restart statefulset/trainer" in guide
    assert "--signal reload" not in guide


def test_every_setting_the_guide_names_exists() -> None:
    """docs/deploy.md names settings by their environment variables: each is a field of
    its service's settings class (docs/settings.md is generated from the same classes)."""
    from tests.deploy_support import SERVICES

    fields = {name for service in SERVICES.values() for name in service.fields()}
    guide = GUIDE.read_text()
    named = set(re.findall(r"\bFEDGATE_(?:GATEWAY|TRAINER|EDGE)_[A-Z0-9_]*[A-Z0-9]\b", guide))
    compose_variables = {n for n in named if re.fullmatch(r"FEDGATE_EDGE_\d+_GPU", n)}
    assert len(named) > 10
    assert named - compose_variables - fields == set()
    settings_doc = (ROOT / "docs" / "settings.md").read_text()
    assert all(f"`{n}`" in settings_doc for n in named - compose_variables)


def test_feedback_tokens_are_signed_with_a_shared_secret_in_compose_and_k8s(
    tmp_path: Path,
) -> None:
    """Without the secret the gateway mints no feedback token and every label goes to the
    whole fleet: both deployments give every gateway replica the same secret file."""
    doc = rendered(tmp_path)
    gw = doc["services"]["gateway"]
    path = gw["environment"]["FEDGATE_GATEWAY_FEEDBACK_SECRET_FILE"]
    mounted = {s["target"]: s["source"] for s in gw["secrets"]}
    assert path == "/run/secrets/feedback-secret" and "feedback-secret" in mounted
    secret = load_yaml(COMPOSE_DIR / "compose.yaml")["secrets"][mounted["feedback-secret"]]
    assert secret["environment"] in example_env() and secret["environment"] in GUIDE.read_text()
    docs = manifests()
    k8s = main_container(docs, "Deployment", "gateway")
    env = {e["name"]: e.get("value") for e in k8s["env"]}
    assert env["FEDGATE_GATEWAY_FEEDBACK_SECRET_FILE"] == "/run/fedgate/feedback-secret"
    (init,) = pod_spec(by_kind(docs, "Deployment", "gateway"))["initContainers"]
    assert "/run/fedgate-ro/feedback-secret" in init["command"]
    assert "feedback-secret=" in GUIDE.read_text()
