"""Settings of one edge runtime (env prefix ``FEDGATE_EDGE_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from fedcore.compression import Mode
from fedcore.edge_id import check_edge_id, edge_id_from_node_name
from fedcore.models import models_setting
from fedcore.secagg.options import SecAggOptions
from fedcore.settings import ServiceSettings, setting_default


class EdgeSettings(ServiceSettings):
    """One edge: its tritonserver, model repository, trust anchor and heartbeat."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_EDGE_", extra="forbid", frozen=True)

    edge_id: str = Field(
        default="",
        description="this edge's id (lowercase letters, digits, dashes); unset: read from "
        "edge_id_file if that file exists, else derived from node_name",
    )
    edge_id_file: Path | None = Field(
        default=None,
        description="file holding this edge's id, used when edge_id is unset and the file "
        "exists (Kubernetes: a per-node override in the node's credentials directory)",
    )
    node_name: str | None = Field(
        default=None,
        description="the machine's name (Kubernetes: spec.nodeName); with no edge_id, the id "
        "is derived from it: lowercase, other characters '-' (a.b.internal: a-b-internal)",
    )
    nats_user: str = Field(default="", description="NATS user name of this edge; unset: edge_id")
    data_dir: Path = Field(description="working directory: model repository, logs, spool")
    models: list[str] = Field(
        default=["digits"],
        description="models to serve: built-in names, entry points of group fedgate.models, "
        "or package.module:SPEC",
    )
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
        description="the trainer's HPKE public key file (fedgate keys init): updates are "
        "sealed to it with the suite it names (X25519 or ML-KEM-768+X25519)"
    )
    update_ack_timeout_s: float = Field(
        default=5.0, gt=0, description="wait for JetStream's ack of an update, per attempt"
    )
    update_publish_attempts: int = Field(default=4, ge=1, description="publish tries per update")
    triton_control_secret_file: Path = Field(
        description="file holding the secret header value that guards Triton's model-control API"
    )
    triton_home: Path | None = Field(
        default=None,
        description="a Triton installation to run (<home>/bin/tritonserver, <home>/backends), "
        "e.g. /opt/tritonserver in the official image; unset: the tritonserver of nvidia-pytriton",
    )
    triton_host: str = Field(default="127.0.0.1", description="address Triton binds")
    triton_http_port: int = Field(default=8000, description="Triton's HTTP port")
    triton_grpc_port: int = Field(default=8001, description="Triton's gRPC port")
    triton_metrics_port: int = Field(default=8002, description="Triton's Prometheus port")
    triton_metrics_host: str | None = Field(
        default=None,
        description="address Triton's metrics port binds (unset: TRITON_HOST); compose puts "
        "inference on a network only the gateway shares and metrics on the fleet network",
    )
    instance_kind: Literal["auto", "KIND_CPU", "KIND_GPU"] = Field(
        default="auto", description="where Triton runs the model; auto: KIND_GPU when a GPU is seen"
    )
    ready_timeout_s: float = Field(
        default=120.0, gt=0, description="longest wait for Triton to be ready at (re)start"
    )
    exit_timeout_s: int = Field(default=10, ge=1, description="Triton's own drain deadline")
    heartbeat_interval_s: float = Field(
        default=1.0, gt=0, description="how often the edge tells the fleet it is alive"
    )
    max_artifact_bytes: int = Field(
        default=256 * 1024 * 1024,
        gt=0,
        description="largest model version (all its files) the edge downloads; a version "
        "of a model of N parameters takes about 8 * N bytes (ONNX and weights.npy)",
    )
    # -- supervision of tritonserver (README "Operations")
    triton_probe_interval_s: float = Field(
        default=1.0, gt=0, description="seconds between liveness probes of tritonserver"
    )
    triton_probe_timeout_s: float = Field(
        default=2.0, gt=0, description="a liveness probe not answered in this time failed"
    )
    triton_probe_failures: int = Field(
        default=3, ge=1, description="failed probes in a row: Triton is hung and restarted"
    )
    triton_restart_base_s: float = Field(
        default=0.5, gt=0, description="first delay before restarting a dead or hung Triton"
    )
    triton_restart_max_s: float = Field(
        default=30.0, gt=0, description="cap of the restart delay (doubling, with jitter)"
    )

    # -- traffic capture (model.py writes the spool; see README "Learning at the edge")
    capture_rate: float = Field(
        default=0.2, ge=0.0, le=1.0, description="share of single-row requests with an id kept"
    )
    spool_capacity: int = Field(default=20000, ge=1, description="captured samples kept")
    spool_tombstones: int = Field(
        default=200000, ge=1, description="evicted request ids remembered (feedback gets 410)"
    )
    spool_max_age_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="samples older than this are evicted"
    )
    # -- idle windows, from Triton's metrics
    idle_poll_interval_s: float = Field(
        default=0.25, gt=0, le=5.0, description="how often Triton's metrics are read for idleness"
    )
    idle_max_pending: int = Field(default=0, ge=0, description="pending requests still idle")
    idle_max_request_rate: float = Field(
        default=2.0, ge=0, description="requests/s (over idle_window_s) still idle"
    )
    idle_max_queue_us: float = Field(default=5000.0, ge=0, description="mean queue time idle")
    idle_quiet_s: float = Field(default=2.0, ge=0, description="quiet this long opens a window")
    idle_window_s: float = Field(default=2.0, gt=0, description="request rate window")
    # -- local fine-tuning
    learning_enabled: bool = Field(default=True, description="fine-tune in idle windows")
    min_new_labels: int = Field(default=32, ge=1, description="new labels before training")
    # the local training recipe: each unset (None) field is the model spec's own; a round
    # announcement's recipe (the trainer's) wins over both
    train_optimizer: Literal["sgd", "adam"] | None = Field(
        default=None, description="local optimiser, sgd or adam (unset: the model spec's)"
    )
    train_epochs: int | None = Field(
        default=None, ge=1, description="local epochs per training window (unset: the spec's)"
    )
    train_batch_size: int | None = Field(
        default=None, ge=1, description="local mini-batch size (unset: the spec's)"
    )
    train_lr: float | None = Field(
        default=None, gt=0, description="local learning rate (unset: the spec's)"
    )
    train_momentum: float | None = Field(
        default=None, ge=0, lt=1, description="local SGD momentum (unset: the spec's)"
    )
    train_weight_decay: float | None = Field(
        default=None, ge=0, description="local L2 weight decay (unset: the spec's)"
    )
    train_max_steps: int | None = Field(
        default=None, ge=1, description="most mini-batches of one local run (unset: the spec's)"
    )
    proximal_mu: float | None = Field(
        default=None, ge=0, description="FedProx term; 0 turns it off (unset: the spec's)"
    )
    clip_norm: float | None = Field(
        default=None, gt=0, description="clip the update's L2 norm to this (None: no clipping)"
    )
    holdout_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="labelled share kept for local evaluation"
    )
    train_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the worker trains; auto: cuda when available"
    )
    train_threads: int = Field(default=1, ge=1, description="torch threads of the worker")
    train_nice: int = Field(default=19, ge=0, le=19, description="CPU niceness of the worker")
    train_sched_idle: bool = Field(
        default=True, description="run the worker under Linux SCHED_IDLE (only spare CPU)"
    )
    train_window_budget_s: float = Field(
        default=120.0, gt=0, description="seconds of training per idle window"
    )
    train_daily_budget_s: float = Field(
        default=3600.0, gt=0, description="seconds of training per UTC day"
    )
    secagg: dict[str, SecAggOptions] = Field(
        default={},
        description="secure aggregation per model (JSON, model -> options): the same "
        "options as the trainer's FEDGATE_TRAINER_SECAGG; such a model's updates leave "
        "this edge only masked, in securely aggregated rounds (docs/secagg.md)",
    )
    secagg_registry_file: Path | None = Field(
        default=None,
        description="the edge registry (fedgate keys enroll): peers' public keys, to verify "
        "their key adverts in secure rounds; needed when secagg is set",
    )
    update_compression: Mode = Field(default="none", description="none, fp16, int8 or topk")
    update_topk_fraction: float = Field(
        default=0.01, gt=0, le=1, description="topk compression: share of coordinates sent"
    )

    def recipe_overrides(self) -> dict[str, Any]:
        """The training recipe's fields these settings override (None: the spec's), by
        :class:`fedcore.spec.TrainingRecipe` field name."""
        return {
            "optimizer": self.train_optimizer,
            "epochs": self.train_epochs,
            "batch_size": self.train_batch_size,
            "lr": self.train_lr,
            "momentum": self.train_momentum,
            "weight_decay": self.train_weight_decay,
            "proximal_mu": self.proximal_mu,
            "max_steps": self.train_max_steps,
        }

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        """References resolved, checked (module on a dummy batch, weights) and named."""
        return models_setting(v, deep=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_edge_id(cls, data: Any) -> Any:
        """edge_id, else the contents of edge_id_file (if it exists, surrounding blanks
        dropped), else from node_name; the NATS user defaults to the edge id. An edge_id
        given is taken as it is: one with blanks is refused, as at every other entrance."""
        if not isinstance(data, dict):
            return data
        edge_id = str(data.get("edge_id") or "")
        id_file = data.get("edge_id_file")
        if not edge_id and id_file and Path(id_file).is_file():
            edge_id = Path(id_file).read_text().strip()
        if not edge_id and data.get("node_name"):
            edge_id = edge_id_from_node_name(str(data["node_name"]))
        if not edge_id:
            return data  # the edge_id field's validator names what to set
        return {**data, "edge_id": edge_id, "nats_user": data.get("nats_user") or edge_id}

    @field_validator("edge_id")
    @classmethod
    def _edge_id(cls, v: str) -> str:
        if not v:
            raise ValueError(
                "no edge id: set edge_id, edge_id_file (an existing file) or node_name"
            )
        return check_edge_id(v)

    @model_validator(mode="after")
    def _secagg(self) -> Self:
        unknown = sorted(set(self.secagg) - set(self.models))
        if unknown:
            raise ValueError(f"secagg names models this edge does not serve: {unknown}")
        if self.secagg and self.secagg_registry_file is None:
            raise ValueError(
                "secagg_registry_file is required with secagg: the enrolled edges' public "
                "keys verify the peers' key adverts (the trainer is not trusted with them)"
            )
        return self


def edge_default(name: str) -> Any:
    """The default of the setting ``name``: what a component built without the settings
    (tests, benchmarks) uses, so that it runs with the value production runs with."""
    return setting_default(EdgeSettings, name)
