"""Settings of the gateway (env prefix ``FEDGATE_GATEWAY_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fedcore.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """The HTTP endpoint, its limits, and how it tracks the fleet."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_GATEWAY_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8080
    heartbeat_ttl_s: float = Field(default=3.5, gt=0, description="edge expires after this silence")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="413 above this")
    upstream_timeout_s: float = Field(default=30.0, gt=0)
