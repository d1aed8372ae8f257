"""Coordinate-wise median (Yin et al., 2018): robust to a minority of bad updates.

Each coordinate of the aggregate is the median of that coordinate over the round's
updates; with ``n`` updates it tolerates fewer than ``n / 2`` arbitrary ones. Weights
are ignored on purpose: a weighted median would let one edge claim a huge example
count and decide the result. It cannot stream (every value of a coordinate is needed
at once): the round state is an :class:`~trainer.aggregate.UpdateBuffer` holding at
most ``capacity`` updates, and the median is taken column block by column block.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from trainer.aggregate import F32Array, F64Array, UpdateBuffer
from trainer.errors import StrategyConfigError
from trainer.strategies.base import (
    OptionValue,
    RoundState,
    StatelessMixin,
    apply_step,
    check_round,
    expect_buffer,
    require_positive,
)


def coordinate_median(updates: F32Array | F64Array) -> F64Array:
    """Median over axis 0 of an ``(n, dim)`` matrix, in FP64 (mean of the two middle
    values when ``n`` is even)."""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"need an (n >= 1, dim) matrix, got shape {updates.shape}")
    out: F64Array = np.median(updates.astype(np.float64), axis=0)
    return out


class Median(StatelessMixin):
    """Coordinate-wise median of at most ``capacity`` updates per round."""

    name: ClassVar[str] = "median"
    streams: ClassVar[bool] = False

    def __init__(self, *, capacity: int = 64, server_lr: float = 1.0) -> None:
        if int(capacity) < 1:
            raise StrategyConfigError(self.name, "capacity", f"must be >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.server_lr = require_positive(self.name, "server_lr", server_lr)

    def options(self) -> dict[str, OptionValue]:
        return {"capacity": self.capacity, "server_lr": self.server_lr}

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        return UpdateBuffer(dim, self.capacity, round_id)

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        return expect_buffer(state, self.name).fold(update, weight)

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        buf = expect_buffer(state, self.name)
        check_round(buf, global_params, self.name)
        out = np.empty(buf.dim, dtype=np.float64)
        for start, stop, block in buf.column_blocks():
            out[start:stop] = coordinate_median(block)
        return apply_step(global_params, out, self.server_lr)
