"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the edges' updates.

``new_global = global + server_lr * sum_i(n_i * delta_i) / sum_i(n_i)`` where ``n_i`` is
edge i's example count (times any staleness discount). Streams: the round state is a
:class:`~trainer.aggregate.WeightedSum`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from trainer.aggregate import F32Array, F64Array, WeightedSum
from trainer.strategies.base import (
    OptionValue,
    RoundState,
    StatelessMixin,
    check_round,
    expect_sum,
    require_positive,
)


def weighted_average(updates: Sequence[F32Array], weights: Sequence[float]) -> F64Array:
    """Batch reference: ``sum_i w_i * u_i / sum_i w_i`` in FP64 (holds every update)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = math.fsum(weights)
    acc = np.zeros(updates[0].shape, dtype=np.float64)
    for u, w in zip(updates, weights, strict=True):
        acc += np.asarray(u, dtype=np.float64) * w
    return acc / total


class FedAvg(StatelessMixin):
    """Sample-weighted FedAvg with an optional server learning rate (1.0: plain FedAvg)."""

    name: ClassVar[str] = "fedavg"
    streams: ClassVar[bool] = True

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = require_positive(self.name, "server_lr", server_lr)

    def options(self) -> dict[str, OptionValue]:
        return {"server_lr": self.server_lr}

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        return WeightedSum(dim, round_id)

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        return expect_sum(state, self.name).fold(update, weight)

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        acc = expect_sum(state, self.name)
        check_round(acc, global_params, self.name)
        return acc.step_onto(global_params, self.server_lr)
