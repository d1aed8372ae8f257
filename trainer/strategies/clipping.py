"""Norm clipping: scale each update to L2 norm at most ``max_norm``, then FedAvg.

``new_global = global + server_lr * sum_i(n_i * c_i * delta_i) / sum_i(n_i)`` with
``c_i = min(1, max_norm / ||delta_i||)``. Bounds what any single edge can move the
model by (a defence against scaled-up poisoned updates) and keeps streaming: the clip
factor is folded into the update's coefficient, so no clipped copy is made.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from trainer.aggregate import F32Array, F64Array, WeightedSum, clip_factor
from trainer.strategies.base import (
    OptionValue,
    RoundState,
    StatelessMixin,
    check_round,
    expect_sum,
    require_positive,
)

__all__ = ["NormClipping", "clip_factor", "clip_update"]


def clip_update(update: F32Array | F64Array, max_norm: float) -> F64Array:
    """``update * min(1, max_norm / ||update||)`` as a new FP64 vector."""
    u = np.asarray(update, dtype=np.float64)
    return u * clip_factor(float(np.linalg.norm(u)), max_norm)


class NormClipping(StatelessMixin):
    """Clip every update to ``max_norm``, then take the sample-weighted mean."""

    name: ClassVar[str] = "clipping"
    streams: ClassVar[bool] = True

    def __init__(self, *, max_norm: float, server_lr: float = 1.0) -> None:
        self.max_norm = require_positive(self.name, "max_norm", max_norm)
        self.server_lr = require_positive(self.name, "server_lr", server_lr)

    def options(self) -> dict[str, OptionValue]:
        return {"max_norm": self.max_norm, "server_lr": self.server_lr}

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        return WeightedSum(dim, round_id)

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        return expect_sum(state, self.name).fold(update, weight, max_norm=self.max_norm)

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        acc = expect_sum(state, self.name)
        check_round(acc, global_params, self.name)
        return acc.step_onto(global_params, self.server_lr)
