"""Settings of one edge runtime (env prefix ``FEDGATE_EDGE_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fedcore.settings import ServiceSettings
from fedcore.wire import check_edge_id


class EdgeSettings(ServiceSettings):
    """One edge: its tritonserver, model repository, trust anchor and heartbeat."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_EDGE_", extra="forbid", frozen=True)

    edge_id: str = Field(description="this edge's id (lowercase letters, digits, dashes)")
    data_dir: Path = Field(description="working directory: model repository, logs, spool")
    models: list[str] = Field(default=["digits"], description="models this edge serves")
    seed_artifacts_dir: Path = Field(
        description="signed version directories to install at start (<dir>/<model>/<version>/)"
    )
    trainer_public_key_file: Path = Field(
        description="hex Ed25519 public key of the trainer, the only signer this edge trusts"
    )
    identity_key_file: Path = Field(
        description="this edge's Ed25519 private key (0600): signs its model updates"
    )
    trainer_hpke_public_key_file: Path = Field(
        description="hex X25519 public key of the trainer: updates are sealed to it (HPKE)"
    )
    update_ack_timeout_s: float = Field(
        default=5.0, gt=0, description="wait for JetStream's ack of an update, per attempt"
    )
    update_publish_attempts: int = Field(default=4, ge=1, description="publish tries per update")
    triton_control_secret_file: Path = Field(
        description="file holding the secret header value that guards Triton's model-control API"
    )
    triton_host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    instance_kind: Literal["auto", "KIND_CPU", "KIND_GPU"] = "auto"
    ready_timeout_s: float = Field(default=120.0, gt=0)
    exit_timeout_s: int = Field(default=10, ge=1, description="Triton's own drain deadline")
    heartbeat_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("edge_id")
    @classmethod
    def _edge_id(cls, v: str) -> str:
        return check_edge_id(v)
