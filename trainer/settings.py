"""Settings of the trainer (env prefix ``FEDGATE_TRAINER_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fedcore.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """The trainer: where global versions live and the key that signs them."""

    model_config = SettingsConfigDict(env_prefix="FEDGATE_TRAINER_", extra="forbid", frozen=True)

    data_dir: Path = Field(description="artifacts/<model>/<version>/ and state/ live here")
    models: list[str] = Field(default=["digits"])
    signing_key_file: Path = Field(description="Ed25519 private key (0600) that signs versions")
    bootstrap_seed_fraction: float = Field(
        default=0.1, gt=0, le=1, description="share of the public train split used for version 1"
    )
    bootstrap_epochs: int = Field(default=8, ge=1)
    seed: int = 0

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "state"
