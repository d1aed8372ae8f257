"""Settings of the gateway (env prefix ``FEDGATE_GATEWAY_``)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fedcore.models import models_setting
from fedcore.settings import NatsReplicas, ServiceSettings, setting_default


def default_instance_id() -> str:
    """``<hostname>-<pid>`` in the characters a KV key allows."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48] or "gateway"
    return f"{name}-{os.getpid()}"


class GatewaySettings(ServiceSettings):
    """The HTTP endpoint, its keys and limits, and how it tracks and routes to the fleet."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_GATEWAY_", extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="address the HTTP server binds")
    port: int = Field(
        default=8080, ge=0, le=65535, description="HTTP port (OIP v2, APIs, dashboard)"
    )
    models: list[str] = Field(
        default=["digits"],
        description="models whose feedback labels this gateway checks: built-in names, entry "
        "points of group fedgate.models, or package.module:SPEC (resolved without torch checks)",
    )

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        return models_setting(v, deep=False)

    api_keys_file: Path | None = Field(
        default=None,
        description="file of API keys, one '<role>:<name>:<sha256-hex>[:<rate>]' per line",
    )
    api_keys: str | None = Field(
        default=None, description="the same entries inline, separated by commas or newlines"
    )
    nats_replicas: NatsReplicas = 1
    dev_mode: bool = Field(
        default=False, description="run without API keys (every request is admin); never in prod"
    )
    rate_limit_per_s: float = Field(
        default=1000.0, ge=0, description="requests/s per key without its own rate; 0: no limit"
    )
    rate_limit_burst_s: float = Field(
        default=2.0, gt=0, description="a key may burst this many seconds' worth of requests"
    )
    heartbeat_ttl_s: float = Field(default=3.5, gt=0, description="edge expires after this silence")
    instance_id: str = Field(
        default_factory=default_instance_id,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="this replica's name among several gateways (rollout lease, gate counts); "
        "default <hostname>-<pid>",
    )
    rollout_lease_ttl_s: float = Field(
        default=3.0,
        gt=0,
        description="a rollout-controller lease not renewed this long is taken over by another "
        "replica",
    )
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="413 above this")
    upstream_timeout_s: float = Field(
        default=30.0, gt=0, description="longest wait for an edge's answer to one request"
    )
    upstream_connect_timeout_s: float = Field(
        default=2.0, gt=0, description="longest wait for a connection to an edge's Triton"
    )
    eject_after_failures: int = Field(
        default=3, ge=1, description="consecutive failures (connection error, 503) to eject"
    )
    eject_base_s: float = Field(default=5.0, gt=0, description="first ejection time, then x2")
    eject_max_s: float = Field(default=60.0, gt=0, description="longest ejection time")
    feedback_secret_file: Path | None = Field(
        default=None,
        description="file holding the secret (16+ bytes, mode 0600, the same on every replica) "
        "that signs feedback tokens; unset: no tokens, feedback is sent to the whole fleet",
    )
    probe_interval_s: float = Field(default=0.5, gt=0, description="how often ejections are due")


def gateway_default(name: str) -> Any:
    """The default of the setting ``name``: what a component built without the settings
    (tests, benchmarks) uses, so that it runs with the value production runs with."""
    return setting_default(GatewaySettings, name)
