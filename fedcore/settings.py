"""Settings shared by every service: NATS connection and logging.

Each service defines one ``BaseSettings`` subclass with its own env prefix
(``FEDGATE_GATEWAY_``, ``FEDGATE_EDGE_``, ``FEDGATE_TRAINER_``). Secrets are never
values with defaults: they are read from files named by settings (``*_file``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedcore.keys import read_secret


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``env_prefix``."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    nats_user: str = Field(description="NATS user name of this service")
    nats_password_file: Path = Field(description="file holding the NATS password (mode 0600)")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_json: bool = Field(default=True, description="structured JSON log lines on stderr")

    def nats_password(self) -> str:
        """The NATS password, read from its file at call time."""
        return read_secret(self.nats_password_file)
