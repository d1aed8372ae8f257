"""The settings a local stack passes to its services, and where each value came from.

``fedgate up`` and ``fedgate demo`` start every service with an environment of its own.
What a user may set there comes, lowest precedence first, from:

1. the settings class's default (``default``);
2. the config file, ``fedgate.toml``: one table per service (``[gateway]``, ``[trainer]``,
   ``[edge]``), keys as in the settings classes (``file``);
3. ``FEDGATE_<SERVICE>_<KEY>`` variables in the environment of ``fedgate`` (``env``);
4. the command's own flags, such as ``--secagg`` (``flag``);
5. ``--set service.key=value`` (``--set``).

The wiring of the stack itself (NATS URL and users, ports, data directories, key files) is
the launcher's (``stack``): a user value for one of those is refused, never silently lost.
Unknown services, unknown keys and values the settings class refuses are errors that name
the closest real setting.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from edge_runtime.settings import EdgeSettings
from fedcore.errors import ConfigError
from fedcore.models import MODEL_VARS
from fedcore.settings import (
    closest_setting,
    env_prefix,
    unknown_env_settings,
    unknown_setting_message,
)
from gateway.settings import GatewaySettings
from trainer.settings import TrainerSettings

SERVICES: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "trainer": TrainerSettings,
    "edge": EdgeSettings,
}
"""The services of a local stack by the name used in ``fedgate.toml`` and ``--set``."""

COMMON_MANAGED = frozenset(
    {
        "nats_url",
        "nats_user",
        "nats_password_file",
        "nats_tls_ca_file",
        "nats_tls_cert_file",
        "nats_tls_key_file",
        "metrics_host",
        "metrics_port",
    }
)
MANAGED: dict[str, frozenset[str]] = {
    "gateway": COMMON_MANAGED | {"host", "port", "api_keys_file", "feedback_secret_file"},
    "trainer": COMMON_MANAGED
    | {
        "data_dir",
        "signing_key_file",
        "hpke_private_key_file",
        "hpke_kem",
        "edge_registry_file",
        "gateway_url",
        "admin_key_file",
    },
    "edge": COMMON_MANAGED
    | {
        "edge_id",
        "data_dir",
        "seed_artifacts_dir",
        "trainer_public_key_file",
        "identity_key_file",
        "trainer_hpke_public_key_file",
        "secagg_registry_file",
        "triton_control_secret_file",
        "triton_host",
        "triton_http_port",
        "triton_grpc_port",
        "triton_metrics_port",
    },
}
"""Settings the launcher sets itself: the stack's wiring, not the user's to change."""

SECRET_WORDS = ("password", "secret", "api_keys", "token")
"""Fields whose value (not a ``*_file`` path) is masked by ``fedgate config show``."""


@dataclass(frozen=True)
class Setting:
    """One effective setting of one service."""

    service: str
    name: str
    value: Any
    source: str  # default, file, env, flag, --set, stack


@dataclass
class StackSettings:
    """User values per service, each with its source; built by :func:`collect`."""

    values: dict[str, dict[str, tuple[Any, str]]] = field(
        default_factory=lambda: {s: {} for s in SERVICES}
    )

    def put(self, service: str, key: str, value: Any, source: str) -> None:
        name = _check_key(service, key, source)
        self.values[service][name] = (value, source)

    def env_overrides(self) -> dict[str, dict[str, str]]:
        """``StackConfig.overrides``: ``{"FEDGATE_TRAINER_": {"MIN_UPDATES": "3"}, ...}``."""
        out: dict[str, dict[str, str]] = {}
        for service, values in self.values.items():
            if not values:
                continue
            prefix = env_prefix(SERVICES[service])
            out[prefix] = {name.upper(): env_value(v) for name, (v, _) in values.items()}
        return out

    def effective(self, service: str) -> list[Setting]:
        """Every field of ``service``'s settings with its value and source, in field order."""
        cls = SERVICES[service]
        rows = []
        for name, info in cls.model_fields.items():
            if name in MANAGED[service]:
                rows.append(Setting(service, name, "(set by the stack)", "stack"))
            elif name in self.values[service]:
                value, source = self.values[service][name]
                rows.append(Setting(service, name, value, source))
            else:
                rows.append(
                    Setting(service, name, info.get_default(call_default_factory=True), "default")
                )
        return rows


def env_value(value: Any) -> str:
    """A value as its environment variable string: JSON for lists and tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _check_key(service: str, key: str, source: str) -> str:
    if service not in SERVICES:
        raise ConfigError(
            unknown_setting_message(source, service, SERVICES).replace(
                "unknown setting", "unknown service"
            )
        )
    name = key.lower()
    fields = SERVICES[service].model_fields
    if name not in fields:
        raise ConfigError(unknown_setting_message(f"{source}: [{service}]", key, fields))
    if name in MANAGED[service]:
        raise ConfigError(
            f"{source}: {service}.{name} is set by the stack itself (ports, users, keys and "
            "directories come from fedgate up's own options)"
        )
    return name


def load_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """``fedgate.toml``: tables of settings by service; a clear error for anything else."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    for service, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"config file {path}: {service!r} must be a table such as [{service}]"
            )
    return data


def parse_set(item: str) -> tuple[str, str, str]:
    """``service.key=value`` -> (service, key, value)."""
    target, sep, value = item.partition("=")
    service, dot, key = target.strip().partition(".")
    if not sep or not dot or not service or not key:
        raise ConfigError(f"--set {item!r}: expected service.key=value, e.g. trainer.min_updates=3")
    return service, key.strip(), value.strip()


def service_env_vars(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``FEDGATE_<SERVICE>_<KEY>`` variables as (service, key, value); an unknown
    ``FEDGATE_*`` variable that is none of the services' is an error naming the closest."""
    prefixes = {env_prefix(cls): service for service, cls in SERVICES.items()}
    # read by the clients (status, rollout), by the edge's Triton model and by built-in
    # models (the width of ``wide``), not a service
    client_vars = {
        "FEDGATE_API_KEY",
        "FEDGATE_URL",
        "FEDGATE_CACERT",
        "FEDGATE_ORT_THREADS",
        *MODEL_VARS,
    }
    found = []
    for var in sorted(environ):
        if not var.startswith("FEDGATE_") or var in client_vars:
            continue
        prefix = next((p for p in prefixes if var.startswith(p)), None)
        if prefix is None:
            every = [p + n.upper() for p, s in prefixes.items() for n in SERVICES[s].model_fields]
            guess = closest_setting(var, every)
            hint = f"; did you mean {guess.upper()}?" if guess else ""
            raise ConfigError(f"environment: {var} is not a fedgate setting{hint}")
        found.append((prefixes[prefix], var[len(prefix) :], environ[var]))
    return found


def collect(
    config_file: Path | None,
    sets: list[str],
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> StackSettings:
    """The user's settings of every service, in precedence order, each checked."""
    out = StackSettings()
    if config_file is not None:
        for service, table in load_config_file(config_file).items():
            for key, value in table.items():
                out.put(service, key, value, "file")
    env = os.environ if environ is None else environ
    unknown = [m for cls in SERVICES.values() for m in unknown_env_settings(cls, env)]
    if unknown:
        raise ConfigError("environment: " + "; ".join(unknown))
    for service, key, value in service_env_vars(env):
        out.put(service, key, value, f"env {env_prefix(SERVICES[service])}{key}")
    for service, implied in (flags or {}).items():
        for key, value in implied.items():
            out.values[service][key] = (value, "flag")
    for item in sets:
        service, key, value = parse_set(item)
        out.put(service, key, value, "--set")
    validate(out)
    return out


def validate(settings: StackSettings) -> None:
    """Each user value through its settings class: the errors of the keys the user set."""
    problems = []
    for service, values in settings.values.items():
        cls = SERVICES[service]
        given = {name: _native(cls, name, v) for name, (v, _) in values.items()}
        try:
            cls.model_validate(given)
        except ValidationError as exc:
            for error in exc.errors():
                loc = [str(p) for p in error["loc"]]
                if loc and loc[0] in given:
                    source = values[loc[0]][1]
                    where = ".".join([service, *loc])
                    problems.append(f"{where} ({source}): {error['msg']}")
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))


def _native(cls: type[BaseSettings], name: str, value: Any) -> Any:
    """A string for a list or table field is JSON, as pydantic-settings reads it from env."""
    if isinstance(value, str) and value[:1] in "[{":
        origin = getattr(cls.model_fields[name].annotation, "__origin__", None)
        if origin in (list, dict):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def masked(setting: Setting) -> str:
    """The value as ``fedgate config show`` prints it: secrets masked, paths as they are."""
    name = setting.name
    secret = any(w in name for w in SECRET_WORDS) and not name.endswith("_file")
    if secret and setting.value not in (None, "") and setting.source != "stack":
        return "****"
    if isinstance(setting.value, list | dict):
        return json.dumps(setting.value)
    return str(setting.value)
