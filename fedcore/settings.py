"""Settings shared by every service: NATS connection and logging.

Each service defines one ``BaseSettings`` subclass with its own env prefix
(``FEDGATE_GATEWAY_``, ``FEDGATE_EDGE_``, ``FEDGATE_TRAINER_``). Secrets are never
values with defaults: they are read from files named by settings (``*_file``).
"""

from __future__ import annotations

import logging
import ssl
import stat
from pathlib import Path
from typing import Annotated, Self, TypeVar

from pydantic import AfterValidator, Field, ValidationError, model_validator
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
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
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


def settings_from_env(cls: type[SettingsT]) -> SettingsT:
    """``cls`` built from the environment; a missing or invalid setting raises
    ``ConfigError`` naming each variable and what is wrong (never the value given)."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = []
        for error in exc.errors():
            field, *path = [str(part) for part in error["loc"]] or ["settings"]
            where = f"{prefix}{field.upper()}" + (f" ({'.'.join(path)})" if path else "")
            problems.append(f"{where}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


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
