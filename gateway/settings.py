"""Settings of the gateway (env prefix ``FEDGATE_GATEWAY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fedcore.models import models_setting
from fedcore.settings import NatsReplicas, ServiceSettings


class GatewaySettings(ServiceSettings):
    """The HTTP endpoint, its keys and limits, and how it tracks and routes to the fleet."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_GATEWAY_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    models: list[str] = Field(
        default=["digits"],
        description="models whose feedback labels this gateway checks: built-in names, entry "
        "points of group fedgate.models, or package.module:SPEC (resolved without torch checks)",
    )

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        return models_setting(v, deep=False)

    port: int = 8080
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
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="413 above this")
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    upstream_connect_timeout_s: float = Field(default=2.0, gt=0)
    eject_after_failures: int = Field(
        default=3, ge=1, description="consecutive failures (connection error, 503) to eject"
    )
    eject_base_s: float = Field(default=5.0, gt=0, description="first ejection time, then x2")
    eject_max_s: float = Field(default=60.0, gt=0)
    probe_interval_s: float = Field(default=0.5, gt=0, description="how often ejections are due")
