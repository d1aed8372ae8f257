"""Secure-aggregation settings as the services read them (JSON in an environment variable).

``FEDGATE_TRAINER_SECAGG`` and ``FEDGATE_EDGE_SECAGG`` map a model name to its options,
e.g. ``{"digits": {"clip_norm": 1.0, "expected_dropout": 0.3}}``; a model not named runs
without secure aggregation. The trainer and every edge of a model must give the same
options: an edge refuses a round whose settings differ from its own.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

from fedcore.errors import ConfigError
from fedcore.secagg.config import SecAggConfig


class SecAggOptions(BaseModel):
    """One model's :class:`SecAggConfig`, validated as a settings field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = 0.5
    clip_norm: float = 1.0
    neighbours: int | None = None
    quant_bits: int | None = None
    stochastic_rounding: bool = True
    expected_dropout: float | None = None

    @model_validator(mode="after")
    def _valid(self) -> Self:
        try:
            self.config()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def config(self) -> SecAggConfig:
        """The protocol's settings object (raises :class:`ConfigError` when inconsistent)."""
        return SecAggConfig(
            threshold=self.threshold,
            clip_norm=self.clip_norm,
            neighbours=self.neighbours,
            quant_bits=self.quant_bits,
            stochastic_rounding=self.stochastic_rounding,
            expected_dropout=self.expected_dropout,
        )
