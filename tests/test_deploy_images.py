"""compose/Dockerfile.*: pinned bases, non-root, real commands and health endpoints, settings
that exist, and a gateway image whose requirements cover what the gateway imports."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.deploy_support import (
    COMPOSE_DIR,
    ROOT,
    SERVICES,
    Dockerfile,
    check_command,
    check_env,
)

NAMES = ["gateway", "trainer", "edge"]


def dockerfile(name: str) -> Dockerfile:
    return Dockerfile.parse(COMPOSE_DIR / f"Dockerfile.{name}")


def base_images(df: Dockerfile) -> list[str]:
    args = {}
    for arg in df.all("ARG"):
        key, _, value = arg.partition("=")
        args[key] = value
    images = []
    for line in df.all("FROM"):
        image = line.split()[0]
        m = re.fullmatch(r"\$\{(\w+)\}", image)
        images.append(args[m.group(1)] if m else image)
    return [i for i in images if i not in ("build",)]


@pytest.mark.parametrize("name", NAMES)
def test_bases_are_pinned(name: str) -> None:
    for image in base_images(dockerfile(name)):
        assert re.search(r":\d[\w.-]*$", image), f"{name}: base {image} is not pinned"
    if name == "edge":
        assert base_images(dockerfile(name)) == ["nvcr.io/nvidia/tritonserver:24.12-py3"]
    else:
        assert all(i.startswith("python:3.11.") for i in base_images(dockerfile(name)))


@pytest.mark.parametrize("name", NAMES)
def test_runs_as_a_non_root_user(name: str) -> None:
    users = dockerfile(name).all("USER")
    assert users and users[-1] == "10001:10001"


@pytest.mark.parametrize("name", NAMES)
def test_command_and_settings_exist(name: str) -> None:
    df = dockerfile(name)
    service = SERVICES[name]
    assert check_command(service, df.exec_form("CMD")) == []
    env = {k: v for k, v in df.env().items() if k.startswith("FEDGATE_")}
    assert check_env(service, env, where=f"Dockerfile.{name}") == []
    instance = service.settings()
    fields = instance.model_fields
    for key, value in env.items():  # the values parse as the field's type
        field = fields[key.removeprefix(service.prefix).lower()]
        if field.annotation is int:
            int(value)


def test_health_checks_probe_the_real_endpoints() -> None:
    gateway = " ".join(dockerfile("gateway").exec_form("HEALTHCHECK"))
    assert "/v1/health/ready" in gateway and "FEDGATE_GATEWAY_PORT" in gateway
    edge = " ".join(dockerfile("edge").exec_form("HEALTHCHECK"))
    assert "/v2/health/ready" in edge
    assert "FEDGATE_EDGE_TRITON_HOST" in edge and "FEDGATE_EDGE_TRITON_HTTP_PORT" in edge
    trainer = " ".join(dockerfile("trainer").exec_form("HEALTHCHECK"))
    assert "manifest.json" in trainer and "FEDGATE_TRAINER_DATA_DIR" in trainer


def test_exposed_ports_match_the_settings() -> None:
    gw = dockerfile("gateway")
    assert gw.all("EXPOSE") == [gw.env()["FEDGATE_GATEWAY_PORT"]]
    edge = dockerfile("edge")
    env = edge.env()
    ports = [env[f"FEDGATE_EDGE_TRITON_{p}_PORT"] for p in ("HTTP", "GRPC", "METRICS")]
    assert edge.all("EXPOSE") == [" ".join(ports)]


@pytest.mark.parametrize("name", NAMES)
def test_copied_sources_exist_and_are_not_ignored(name: str) -> None:
    df = dockerfile(name)
    ignore = (COMPOSE_DIR / f"Dockerfile.{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for copy in df.all("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
            assert any(src == a or src.startswith(a + "/") for a in allowed), src


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distribution names reachable from ``requirements`` (extras and markers included)."""
    seen: set[str] = set()
    todo = [r.name for r in requirements]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r).name for r in md.requires(name) or []]
        except md.PackageNotFoundError:
            continue
    return seen


def test_gateway_requirements_cover_its_imports() -> None:
    """Everything ``python -m gateway`` imports is installed by the gateway image."""
    code = (
        "import sys, importlib.metadata as md, gateway.__main__, gateway.app\n"
        "pd = md.packages_distributions()\n"
        "mods = {m.split('.')[0] for m in list(sys.modules)}\n"
        "print('\\n'.join(sorted({d for m in mods for d in pd.get(m, [])})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    imported = {re.sub(r"[-_.]+", "-", d).lower() for d in out.split()} - {"fedgate"}
    lines = (COMPOSE_DIR / "requirements" / "gateway.txt").read_text().splitlines()
    reqs = [Requirement(x) for x in lines if x.strip() and not x.startswith("#")]
    missing = imported - _closure(reqs)
    assert not missing, f"add to compose/requirements/gateway.txt: {sorted(missing)}"
    unused = {re.sub(r"[-_.]+", "-", r.name).lower() for r in reqs} - imported
    assert not unused, f"the gateway imports none of {sorted(unused)}: drop them"
    forbidden = {"torch", "onnx", "onnxruntime", "nvidia-pytriton"} & _closure(reqs)
    assert not forbidden, f"the gateway image would pull {forbidden}"
