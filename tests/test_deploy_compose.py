"""compose/: validated statically (no Docker engine here).

The compose file against the Compose Specification's JSON schema (vendored, see
compose/schema/README.md), alone and merged with the CPU override; its environment against
the services' settings classes as they are now; its commands against the services' entry
points; its ports, networks, secrets, health conditions and GPU reservations against each
other and against the NATS, HAProxy and Prometheus configs it mounts. Each check is also
run on a broken copy to show it catches the fault.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from tests.deploy_support import (
    COMPOSE_DIR,
    ROOT,
    MissingVariable,
    check_command,
    check_env,
    check_required,
    interpolate,
    load_yaml,
    merge,
    service_for_image,
    variables,
)

SCHEMA = json.loads((COMPOSE_DIR / "schema" / "compose-spec.json").read_text())
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"


def example_env() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip() or "x"
    return env


def compose(cpu: bool = False) -> dict[str, Any]:
    doc = load_yaml(COMPOSE_DIR / "compose.yaml")
    if cpu:
        doc = merge(doc, load_yaml(COMPOSE_DIR / "compose.cpu.yaml"))
    out = interpolate(doc, example_env())
    assert isinstance(out, dict)
    return out


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def fedgate_services(doc: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in doc["services"].items() if service_for_image(s.get("image", ""))}


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    return {k: str(v) for k, v in env.items()}


# -- schema ------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu-override"])
def test_compose_file_matches_the_compose_specification(cpu: bool) -> None:
    assert schema_errors(compose(cpu)) == []


def test_the_schema_check_catches_mistakes() -> None:
    doc = compose()
    bad = copy.deepcopy(doc)
    bad["services"]["nats"]["healthcheck"]["intervall"] = "5s"
    assert any("intervall" in e for e in schema_errors(bad))
    bad = copy.deepcopy(doc)
    bad["services"]["gateway"]["depends_on"]["nats"]["condition"] = "service_helthy"
    assert schema_errors(bad)
    bad = copy.deepcopy(doc)
    bad["services"]["edge-1"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilitys"
    ] = ["gpu"]
    assert schema_errors(bad)


# -- required variables fail fast --------------------------------------------------------
def test_required_secrets_fail_fast() -> None:
    doc = load_yaml(COMPOSE_DIR / "compose.yaml")
    env = example_env()
    for name in ["FEDGATE_SECRETS", "NATS_PASSWORD_EDGE_2"]:
        partial = {k: v for k, v in env.items() if k != name}
        with pytest.raises(MissingVariable) as info:
            interpolate(doc, partial)
        assert info.value.name == name
    for name, secret in doc["secrets"].items():
        if "file" in secret:
            assert secret["file"].startswith("${FEDGATE_SECRETS:?"), name
        else:  # from the environment: the NATS server or the example file requires them
            assert secret["environment"] in env, f"{name}: add it to compose/.env.example"
    assert variables(doc, (":?", "?")) <= set(env)
    nats_env = doc["services"]["nats"]["environment"]
    assert all(":?" in v for v in nats_env.values())


# -- settings, commands, images ----------------------------------------------------------
def check_services(doc: dict[str, Any]) -> list[str]:
    from tests.deploy_support import Dockerfile

    problems = []
    for name, svc in fedgate_services(doc).items():
        service = service_for_image(svc["image"])
        assert service is not None
        env = env_of(svc)
        problems += check_env(service, env, where=f"compose service {name}")
        image_env = Dockerfile.parse(COMPOSE_DIR / f"Dockerfile.{service.name}").env()
        fedgate_image_env = {k: v for k, v in image_env.items() if k.startswith("FEDGATE_")}
        problems += check_required(service, {*env, *fedgate_image_env}, where=name)
        problems += check_command(service, svc["command"])
    return problems


def test_every_variable_and_command_exists_in_the_services() -> None:
    assert check_services(compose()) == []
    assert check_services(compose(cpu=True)) == []


def test_the_settings_check_catches_mistakes() -> None:
    doc = compose()
    doc["services"]["edge-1"]["environment"]["FEDGATE_EDGE_TRITON_PORT"] = "8000"
    doc["services"]["gateway"]["environment"]["FEDGATE_EDGE_EDGE_ID"] = "x"
    del doc["services"]["edge-2"]["environment"]["FEDGATE_EDGE_IDENTITY_KEY_FILE"]
    doc["services"]["trainer"]["command"] = ["python", "-m", "trainer", "train"]
    doc["services"]["gateway"]["command"] = ["python", "-m", "gateway.app"]
    problems = "\n".join(check_services(doc))
    for needle in [
        "FEDGATE_EDGE_TRITON_PORT",
        "FEDGATE_EDGE_EDGE_ID",
        "FEDGATE_EDGE_IDENTITY_KEY_FILE",
        "'train'",
        "gateway.app",
    ]:
        assert needle in problems


def mounts(svc: dict[str, Any]) -> set[str]:
    """Paths a service's container gets from its secrets and volumes."""
    paths = set()
    for s in svc.get("secrets", []):
        target = s["target"] if isinstance(s, dict) else s
        paths.add(target if target.startswith("/") else f"/run/secrets/{target}")
    for v in svc.get("volumes", []):
        paths.add(v.split(":")[1])
    return paths


def test_every_file_setting_is_mounted() -> None:
    doc = compose()
    for name, svc in fedgate_services(doc).items():
        available = mounts(svc)
        for key, value in env_of(svc).items():
            if key.endswith(("_FILE", "_DIR")):
                assert any(
                    value == m or value.startswith(m.rstrip("/") + "/") for m in available
                ), f"{name}: {key}={value} is not mounted"


def test_secrets_are_defined_and_used() -> None:
    doc = compose()
    used = set()
    for svc in doc["services"].values():
        for s in svc.get("secrets", []):
            used.add(s["source"] if isinstance(s, dict) else s)
    assert used == set(doc["secrets"])


def test_third_party_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        if "build" in svc or service_for_image(svc["image"]):
            continue
        image = svc["image"]
        assert re.search(r":[0-9v][\w.-]*$", image), f"{name}: {image} is not pinned"
        assert not image.endswith(":latest")


# -- health, GPUs, networks, ports ---------------------------------------------------------
def test_depends_on_waits_for_health() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            condition = cond["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), name
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}: no healthcheck"
            else:
                assert services[dep].get("restart") == "no", dep


def gpu_devices(svc: dict[str, Any]) -> Any:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_edges_reserve_a_gpu_and_the_cpu_override_drops_it() -> None:
    gpu, cpu = compose(), compose(cpu=True)
    edges = [n for n, s in fedgate_services(gpu).items() if s["image"].startswith("fedgate-edge")]
    assert len(edges) == 2
    for name in edges:
        (device,) = gpu_devices(gpu["services"][name])
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert gpu["services"][name]["environment"]["FEDGATE_EDGE_INSTANCE_KIND"] == "KIND_GPU"
        assert gpu_devices(cpu["services"][name]) == []
        assert cpu["services"][name]["environment"]["FEDGATE_EDGE_INSTANCE_KIND"] == "KIND_CPU"
    ids = [gpu_devices(gpu["services"][n])[0]["device_ids"] for n in edges]
    assert ids[0] != ids[1], "by default each edge has its own GPU"


def test_only_the_front_door_is_published() -> None:
    doc = compose()
    assert doc["networks"]["fleet"]["internal"] is True
    published = {n for n, s in doc["services"].items() if s.get("ports")}
    assert published == {"ingress", "grafana", "prometheus"}
    assert doc["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert doc["networks"]["serving"]["internal"] is True
    for name, svc in fedgate_services(doc).items():
        nets = set(svc["networks"])
        assert nets <= {"fleet", "serving"}, f"{name} must live on the internal networks only"


def test_only_the_gateway_reaches_an_edges_triton() -> None:
    """#16 finding 7: in compose every container on the fleet network reached every
    Triton directly, past the gateway's keys. Triton's inference ports now bind the edge's
    address on `serving`, which only the gateway and the edges join."""
    doc = compose()
    on_serving = {n for n, s in doc["services"].items() if "serving" in s.get("networks", [])}
    edges = {n for n, s in doc["services"].items() if n.startswith("edge-")}
    assert on_serving == {"gateway", *edges}
    for name in edges:
        svc = doc["services"][name]
        env = env_of(svc)
        assert env["FEDGATE_EDGE_TRITON_HOST"] == svc["networks"]["serving"]["ipv4_address"]
        assert env["FEDGATE_EDGE_TRITON_METRICS_HOST"] == svc["networks"]["fleet"]["ipv4_address"]


def _port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


def nats_conf() -> str:
    return (COMPOSE_DIR / "nats" / "nats.conf").read_text()


def check_ports(doc: dict[str, Any]) -> list[str]:
    problems = []
    services = doc["services"]
    conf = nats_conf()
    client = int(re.search(r"^listen: [\d.]+:(\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
    monitor = int(re.search(r"^http: [\d.]+:(\d+)", conf, re.M).group(1))  # type: ignore[union-attr]
    prometheus = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in prometheus["scrape_configs"]
    }
    for name, svc in fedgate_services(doc).items():
        env = env_of(svc)
        for key, value in env.items():
            if key.endswith("_NATS_URL"):
                for server in value.split(","):
                    if _port(server) != ("nats", client):
                        problems.append(f"{name}: {key}={server}, nats listens on {client}")
        health = " ".join(svc.get("healthcheck", {}).get("test", []))
        if svc["image"].startswith("fedgate-edge"):
            host = env["FEDGATE_EDGE_TRITON_HOST"]
            if svc["networks"]["serving"]["ipv4_address"] != host:
                problems.append(f"{name}: Triton binds {host}, not the edge's serving address")
            http = env["FEDGATE_EDGE_TRITON_HTTP_PORT"]
            if f"http://{host}:{http}/v2/health/ready" not in health:
                problems.append(f"{name}: healthcheck does not probe Triton at {host}:{http}")
            metrics_host = env.get("FEDGATE_EDGE_TRITON_METRICS_HOST", host)
            metrics = f"{metrics_host}:{env['FEDGATE_EDGE_TRITON_METRICS_PORT']}"
            if metrics not in targets["triton"]:
                problems.append(f"{name}: Prometheus does not scrape Triton at {metrics}")
        if svc["image"].startswith("fedgate-gateway"):
            port = env["FEDGATE_GATEWAY_PORT"]
            if f"http://127.0.0.1:{port}/v1/health/ready" not in health:
                problems.append(f"gateway: healthcheck does not probe port {port}")
            if targets["gateway"] != [f"{name}:{port}"]:
                problems.append(f"gateway: Prometheus scrapes {targets['gateway']}")
            haproxy = (COMPOSE_DIR / "haproxy" / "haproxy.cfg").read_text()
            if not re.search(rf"^\s+server-template gateway \d+-\d+ {name}:{port} ", haproxy, re.M):
                problems.append(f"ingress: HAProxy does not forward to {name}:{port}")
    nats_health = " ".join(services["nats"]["healthcheck"]["test"])
    if f"127.0.0.1:{monitor}/healthz" not in nats_health:
        problems.append(f"nats: healthcheck does not probe the monitor port {monitor}")
    if f"http://nats:{monitor}" not in services["nats-exporter"]["command"]:
        problems.append("nats-exporter: does not read the NATS monitor port")
    exporter = services["nats-exporter"]["command"]
    exporter_port = exporter[exporter.index("-port") + 1]
    if targets["nats"] != [f"nats-exporter:{exporter_port}"]:
        problems.append("prometheus: the NATS exporter target does not match its port")
    datasource = load_yaml(COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml")
    if datasource["datasources"][0]["url"] != "http://prometheus:9090":
        problems.append("grafana: datasource is not prometheus:9090")
    return problems


def test_ports_match_across_the_files() -> None:
    assert check_ports(compose()) == []


def test_the_port_check_catches_mistakes() -> None:
    doc = compose()
    doc["services"]["edge-2"]["environment"]["FEDGATE_EDGE_TRITON_HTTP_PORT"] = "9000"
    doc["services"]["edge-1"]["environment"]["FEDGATE_EDGE_TRITON_HOST"] = "172.29.0.99"
    doc["services"]["gateway"]["environment"]["FEDGATE_GATEWAY_PORT"] = "8081"
    doc["services"]["trainer"]["environment"]["FEDGATE_TRAINER_NATS_URL"] = "tls://nats:4223"
    problems = "\n".join(check_ports(doc))
    assert "edge-2: healthcheck" in problems
    assert "edge-1: Triton binds 172.29.0.99" in problems
    assert "gateway: healthcheck does not probe port 8081" in problems
    assert "trainer: FEDGATE_TRAINER_NATS_URL" in problems


def test_every_nats_user_has_a_password_and_a_service() -> None:
    doc = compose()
    accounts = (COMPOSE_DIR / "nats" / "accounts.conf").read_text()
    # users are named by their client certificate (verify_and_map): CN=<user>,O=fedgate
    users = re.findall(r'^\s*user: "CN=([\w-]+),O=fedgate"\s*$', accounts, re.M)
    assert len(users) == accounts.count("user:") == 4
    passwords = re.findall(r"password: \$(\w+)", accounts)
    assert set(passwords) == set(doc["services"]["nats"]["environment"])
    service_users = set()
    for name, svc in fedgate_services(doc).items():
        user = next(v for k, v in env_of(svc).items() if k.endswith("_NATS_USER"))
        service_users.add(user)
        # the certificate it presents names that user
        cert = [s["source"] for s in svc["secrets"] if s.get("target") == "nats-client.crt"]
        assert cert == [f"tls-{user}-cert"], name
    assert service_users == set(users)
    for user in users:
        var = "NATS_PASSWORD_" + user.upper().replace("-", "_")
        assert var in passwords, user


def test_key_files_come_from_fedgate_keys(tmp_path: Path) -> None:
    """Every TLS and key file the compose file mounts is one that ``fedgate keys tls`` or
    ``fedgate keys init`` writes, at the paths docs/deploy.md gives."""
    from fedgate.cli import main

    assert main(["keys", "tls", "--dir", str(tmp_path / "tls"), "--edges", "2"]) == 0
    assert main(["keys", "init", "--dir", str(tmp_path / "keys"), "--edges", "2"]) == 0
    (tmp_path / "gateway-api-keys").write_text("")  # made by hand, see docs/deploy.md
    doc = load_yaml(COMPOSE_DIR / "compose.yaml")
    env = example_env() | {"FEDGATE_SECRETS": str(tmp_path)}
    secrets = interpolate(doc, env)["secrets"]
    files = {name: Path(s["file"]) for name, s in secrets.items() if "file" in s}
    assert files
    for name, path in files.items():
        assert path.is_file(), f"{name}: nothing writes {path}"
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert 'fedgate keys tls  --dir "$FEDGATE_SECRETS/tls"' in guide
    assert 'fedgate keys init --dir "$FEDGATE_SECRETS/keys"' in guide


def guide_commands() -> list[str]:
    """``fedgate ...`` command lines in docs/deploy.md and the compose file's comments."""
    texts = [(ROOT / "docs" / "deploy.md").read_text(), (COMPOSE_DIR / "compose.yaml").read_text()]
    found = []
    for text in texts:
        found += re.findall(r"`(fedgate [^`]+)`", text)
        found += re.findall(r"^[#\s]*(fedgate (?:keys|up|demo|status|rollout)[^\n]*)$", text, re.M)
    return found


def test_commands_in_the_guide_exist() -> None:
    import shlex

    from fedgate.cli import build_parser

    commands = guide_commands()
    assert len(commands) >= 5
    placeholders = {"<id>": "edge-9", "<hex>": "ab" * 32, "$(hostname -f)": "host.example"}
    for command in commands:
        line = command
        for old, new in placeholders.items():
            line = line.replace(old, new)
        argv = shlex.split(line.split("#")[0])[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"docs/deploy.md: {line!r} is not a fedgate command") from exc
