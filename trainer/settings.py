"""Settings of the trainer (env prefix ``FEDGATE_TRAINER_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fedcore.models import models_setting
from fedcore.secagg.options import SecAggOptions
from fedcore.settings import NatsReplicas, ServiceSettings, setting_default
from fedcore.transport import StreamSpec


class TrainerSettings(ServiceSettings):
    """The trainer: where global versions live and the key that signs them."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_TRAINER_", extra="forbid", frozen=True)

    data_dir: Path = Field(description="artifacts/<model>/<version>/ and state/ live here")
    models: list[str] = Field(
        default=["digits"],
        description="models the trainer runs rounds for: built-in names, entry points of "
        "group fedgate.models, or package.module:SPEC",
    )

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        """References resolved, checked (module on a dummy batch, weights) and named."""
        return models_setting(v, deep=True)

    signing_key_file: Path = Field(description="Ed25519 private key (0600) that signs versions")
    bootstrap_seed_fraction: float = Field(
        default=0.1, gt=0, le=1, description="share of the public train split used for version 1"
    )
    bootstrap_epochs: int = Field(
        default=8, ge=1, description="epochs of the short training that makes version 1"
    )
    seed: int = Field(default=0, description="seed of version 1 and of every random choice")
    hpke_private_key_file: Path = Field(
        description="HPKE private key (0600) edges seal their updates to, of HPKE_KEM"
    )
    hpke_kem: Literal["x25519", "mlkem768-x25519"] = Field(
        default="x25519",
        description="KEM of the HPKE key: x25519, or mlkem768-x25519 (hybrid post-quantum, "
        "fedgate keys init --kem mlkem768-x25519); a key file of the other KEM is refused, "
        "and so is every update sealed with another suite",
    )
    edge_registry_file: Path = Field(
        description="enrolled edges and their Ed25519 public keys (fedgate keys enroll)"
    )
    max_update_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="largest sealed update accepted, in bytes"
    )
    updates_duplicate_window_s: float = Field(
        default=120.0, gt=0, description="JetStream deduplication window of the updates stream"
    )
    updates_max_age_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="how long the updates stream keeps messages"
    )
    updates_max_bytes: int = Field(
        default=StreamSpec.max_bytes,
        gt=0,
        description="bytes the updates stream holds at most; new updates are refused when full",
    )
    updates_max_msgs_per_subject: int = Field(
        default=StreamSpec.max_msgs_per_subject,
        gt=0,
        description="updates one edge may have in the stream per model (messages of at most "
        "256 KiB; larger updates go through the object store); its next ones are refused",
    )
    updates_object_max_bytes: int = Field(
        default=StreamSpec.object_max_bytes,
        gt=0,
        description="bytes the object bucket of large updates holds at most",
    )
    updates_ack_wait_s: float = Field(
        default=30.0, gt=0, description="redelivery delay of an unacknowledged update"
    )
    nats_replicas: NatsReplicas = 1
    strategy: str = Field(default="fedavgm", description="aggregation strategy by name")
    strategy_options: dict[str, float | int | str] = Field(
        default={"eta": 2.0, "momentum": 0.7}, description="options of the strategy (JSON)"
    )
    dp_epsilon_budget: float | None = Field(
        default=None, gt=0, description="dp_fedavg: total epsilon per model; rounds stop when spent"
    )
    dp_delta: float = Field(
        default=1e-5, gt=0, lt=1, description="dp_fedavg: the delta of (eps, delta)-DP"
    )
    round_mode: Literal["sync", "async"] = Field(
        default="sync",
        description="sync: a round closes at quorum or deadline; async: a buffer of updates "
        "closes when full, stale updates weighted down",
    )
    min_updates: int = Field(
        default=1,
        ge=1,
        description="sync: updates needed to close; async: updates a buffer needs to close "
        "at its timeout",
    )
    round_deadline_s: float = Field(
        default=60.0,
        gt=0,
        description="sync: round deadline; async: buffer timeout (closes with MIN_UPDATES)",
    )
    sample_fraction: float = Field(default=1.0, gt=0, le=1, description="sync: edges invited")
    buffer_size: int = Field(default=3, ge=1, description="async: updates per aggregation")
    max_staleness: int = Field(default=2, ge=0, description="async: oldest base accepted")
    # overrides of the model spec's training recipe (fedcore.spec.TrainingRecipe): what
    # every round announcement tells edges (unset: the edge's own), and version 1's bootstrap
    local_epochs: int | None = Field(
        default=None, ge=1, description="edges' local epochs per round (unset: the edge's)"
    )
    local_lr: float | None = Field(
        default=None, gt=0, description="edges' local learning rate (unset: the edge's)"
    )
    local_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="edges' local mini-batch size (unset: the edge's), and version 1's "
        "bootstrap batch (unset: the model spec's)",
    )
    local_max_steps: int | None = Field(
        default=None, ge=1, description="most mini-batches of one local run (unset: the edge's)"
    )
    local_proximal_mu: float | None = Field(
        default=None,
        ge=0,
        description="FedProx term edges add (unset: strategy fedprox's mu, else the edge's)",
    )
    staleness_exponent: float = Field(
        default=0.5, ge=0, description="async: an update s rounds stale weighs (1 + s)^-exponent"
    )
    step_backoff: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="after a held round, the next candidate's server step is scaled by this "
        "(again per hold, down to 1/8); a release scales it back up; 1 turns it off",
    )
    max_samples_per_update: int = Field(
        default=20_000,
        ge=1,
        description="largest sample count an update may weigh (claims above it are capped; "
        "the edges' default spool holds 20000 samples)",
    )
    sample_weight_ratio: float | None = Field(
        default=2.0,
        ge=1,
        description="an update weighs at most this many times the round's median claimed "
        "sample count (None: no relative cap; not applied to dp_fedavg)",
    )
    update_norm_ratio: float | None = Field(
        default=2.0,
        ge=1,
        description="an update is clipped to this many times the round's median update norm "
        "(None: off; not applied to dp_fedavg, which clips to its own clip_norm)",
    )
    update_clip_norm: float | None = Field(
        default=None, gt=0, description="an update is clipped to this L2 norm (None: off)"
    )
    bounds_warmup: int = Field(
        default=3,
        ge=1,
        description="updates held back at the start of a round until the medians of the "
        "relative bounds are known (memory: 4 * warmup * parameters bytes)",
    )
    heartbeat_ttl_s: float = Field(
        default=5.0,
        gt=0,
        description="an edge silent this long is no longer invited into rounds (edges beat "
        "every FEDGATE_EDGE_HEARTBEAT_INTERVAL_S, 1 s by default)",
    )
    gate_margin: float = Field(
        default=0.01, ge=0, description="hold back a candidate this much less accurate"
    )
    gate_z: float | None = Field(
        default=None,
        ge=0,
        description="central gate: the margin is at least this many paired standard errors "
        "of candidate minus serving on the evaluation set (None: GATE_MARGIN alone)",
    )
    round_interval_s: float = Field(default=0.5, ge=0, description="pause between rounds")
    # federated evaluation: the gate of a model the trainer holds no evaluation set for
    fed_eval_min_edges: int = Field(
        default=2, ge=1, description="edges that must report before federated evaluation decides"
    )
    fed_eval_min_samples: int = Field(
        default=20, ge=1, description="held-out samples the reporting edges must hold in all"
    )
    fed_eval_max_samples_per_edge: int = Field(
        default=5000, ge=1, description="one edge's reported held-out count weighs at most this"
    )
    fed_eval_timeout_s: float = Field(
        default=10.0, gt=0, description="how long the trainer gathers the edges' reports"
    )
    max_rounds: int | None = Field(
        default=None, ge=1, description="stop opening rounds of a model after N of its rounds"
    )
    gateway_url: str | None = Field(
        default=None, description="gateway asked to roll out each released version (None: not)"
    )
    admin_key_file: Path | None = Field(
        default=None, description="file with a gateway API key of role admin (rollout requests)"
    )
    rollout_options: dict[str, Any] = Field(
        default={"canary": 10.0},
        description="rollout request fields besides the version (JSON): canary, stages, gates...",
    )

    secagg: dict[str, SecAggOptions] = Field(
        default={},
        description="secure aggregation per model (JSON): model -> options (clip_norm, "
        "threshold, neighbours, expected_dropout, quant_bits, stochastic_rounding); the "
        "edges of that model must give the same options (docs/secagg.md)",
    )
    secagg_phase_timeout_s: float = Field(
        default=10.0, gt=0, description="secure rounds: deadline of each step but the masked input"
    )
    secagg_resend_s: float = Field(
        default=1.0, gt=0, description="secure rounds: resend a step to edges that did not answer"
    )

    def recipe_overrides(self) -> dict[str, Any]:
        """The training recipe's fields the ``LOCAL_*`` settings override (None: the
        model spec's), by :class:`fedcore.spec.TrainingRecipe` field name: what round
        announcements tell edges, and what version 1's bootstrap trains with."""
        return {
            "proximal_mu": self.local_proximal_mu,
            "epochs": self.local_epochs,
            "lr": self.local_lr,
            "batch_size": self.local_batch_size,
            "max_steps": self.local_max_steps,
        }

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "state"


def trainer_default(name: str) -> Any:
    """The default of the setting ``name``: what a component built without the settings
    (tests, benchmarks) uses, so that it runs with the value production runs with."""
    return setting_default(TrainerSettings, name)
