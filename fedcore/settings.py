"""Settings shared by every service: NATS connection and logging.

Each service defines one ``BaseSettings`` subclass with its own env prefix
(``FEDGATE_GATEWAY_``, ``FEDGATE_EDGE_``, ``FEDGATE_TRAINER_``). Secrets are never
values with defaults: they are read from files named by settings (``*_file``).
"""

from __future__ import annotations

import difflib
import logging
import os
import ssl
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedcore.errors import ConfigError, KeyFileError
from fedcore.keys import read_secret
from fedcore.logs import configure_logging
from fedcore.replicas import check_replicas
from fedcore.subjects import inbox_prefix

NatsReplicas = Annotated[
    int,
    AfterValidator(check_replicas),
    Field(
        description="replicas of the streams and buckets this service creates (1, 3 or 5; 3 on a "
        "3-node JetStream cluster); an existing one with fewer is scaled up at start"
    ),
]
"""The ``nats_replicas`` setting of the services that create JetStream assets."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]
"""A logging level name, any case (``info`` is ``INFO``)."""


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``env_prefix``."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    nats_user: str = Field(description="NATS user name of this service")
    nats_password_file: Path = Field(description="file holding the NATS password (mode 0600)")
    nats_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle that signs the NATS server certificate (turns on TLS)"
    )
    nats_tls_cert_file: Path | None = Field(
        default=None, description="this service's NATS client certificate (mutual TLS)"
    )
    nats_tls_key_file: Path | None = Field(
        default=None, description="private key of the client certificate (mode 0600)"
    )
    log_level: LogLevel = Field(
        default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)"
    )
    log_json: bool = Field(default=True, description="structured JSON log lines on stderr")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="trainer and edges: serve Prometheus metrics at http://<metrics_host>:"
        "<port>/metrics (unset: off; the gateway serves /metrics on its own port)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address the metrics port binds")

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError("nats_tls_cert_file and nats_tls_key_file go together")
        return self

    def nats_password(self) -> str:
        """The NATS password, read from its file at call time."""
        return read_secret(self.nats_password_file)

    def nats_inbox_prefix(self) -> str:
        """The ``inbox_prefix=`` argument of ``nats.connect``: ``_INBOX_<nats_user>``, the
        only inbox prefix the deployment lets this user subscribe to."""
        return inbox_prefix(self.nats_user)

    def nats_tls_context(self) -> ssl.SSLContext | None:
        """The ``tls=`` argument of ``nats.connect``: None unless a NATS TLS file is set.

        Verifies the server against ``nats_tls_ca_file`` (the system store when unset) and
        presents the client certificate when one is configured. TLS 1.2 at least.
        """
        if self.nats_tls_ca_file is None and self.nats_tls_cert_file is None:
            return None
        ca = str(self.nats_tls_ca_file) if self.nats_tls_ca_file is not None else None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.nats_tls_cert_file is not None and self.nats_tls_key_file is not None:
            _check_private(self.nats_tls_key_file)
            ctx.load_cert_chain(self.nats_tls_cert_file, self.nats_tls_key_file)
        return ctx


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def setting_default(cls: type[BaseSettings], name: str) -> Any:
    """The default of the setting ``name`` of ``cls``. Component configs built from the
    settings take their own defaults from here, so a component used without the settings
    (tests, benchmarks) runs with the values production runs with; a setting without a
    default (a required one) is a :class:`ConfigError`."""
    field = cls.model_fields[name]
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    if field.is_required():
        raise ConfigError(f"{cls.__name__}.{name} has no default")
    return field.default


def env_prefix(cls: type[BaseSettings]) -> str:
    """The environment prefix of a settings class, e.g. ``FEDGATE_TRAINER_``."""
    return str(cls.model_config.get("env_prefix", ""))


def closest_setting(name: str, known: Iterable[str]) -> str | None:
    """The known setting most like ``name`` (a typo's likely meaning), if any is close."""
    matches = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_setting_message(where: str, name: str, known: Iterable[str]) -> str:
    """``<where>: unknown setting NAME`` with the closest real one, for every such error."""
    guess = closest_setting(name, known)
    hint = f"; did you mean {guess}?" if guess else ""
    return f"{where}: unknown setting {name!r}{hint}"


def unknown_env_settings(
    cls: type[BaseSettings], environ: Mapping[str, str] | None = None
) -> list[str]:
    """One message per variable that carries ``cls``'s prefix but names no setting of it.

    pydantic-settings ignores such variables, so a typo (``FEDGATE_TRAINER_MIN_UPDATE``)
    would silently leave the default in force; services refuse to start instead.
    """
    prefix = env_prefix(cls)
    env = os.environ if environ is None else environ
    known = [name.upper() for name in cls.model_fields]
    problems = []
    for var in sorted(env):
        if not prefix or not var.startswith(prefix):
            continue
        name = var[len(prefix) :]
        if name in known:
            continue
        guess = closest_setting(name, known)
        hint = f"; did you mean {prefix}{guess.upper()}?" if guess else ""
        problems.append(f"{var}: not a setting of this service{hint}")
    return problems


def settings_from_env(cls: type[SettingsT]) -> SettingsT:
    """``cls`` built from the environment; a missing, invalid or unknown setting raises
    ``ConfigError`` naming each variable and what is wrong (never the value given)."""
    problems = unknown_env_settings(cls)
    try:
        settings = cls()
    except ValidationError as exc:
        problems += validation_problems(exc, env_prefix(cls))
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return settings


def validation_problems(exc: ValidationError, prefix: str) -> list[str]:
    """``<PREFIX><FIELD> (nested.path): what is wrong`` per error, never the value given."""
    problems = []
    for error in exc.errors():
        field, *path = [str(part) for part in error["loc"]] or ["settings"]
        where = f"{prefix}{field.upper()}" + (f" ({'.'.join(path)})" if path else "")
        problems.append(f"{where}: {error['msg']}")
    return problems


def load_settings(cls: type[SettingsT], service: str) -> SettingsT | None:
    """:func:`settings_from_env` for a service's ``main``: None after logging why not (the
    caller exits 2), so a bad setting ends in one clear line, not a traceback."""
    try:
        return settings_from_env(cls)
    except ConfigError as exc:
        configure_logging(service)
        logging.getLogger(service).error("%s not started: %s", service, exc)
        return None


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"private key file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
