"""Coordinate-wise trimmed mean (Yin et al., 2018).

For each coordinate, drop the ``k = floor(beta * n)`` largest and ``k`` smallest of the
``n`` values and average the rest; it tolerates up to ``k`` arbitrary updates per side.
``beta < 0.5`` always leaves at least one value (``floor(beta * n) < n / 2``). Weights
are ignored on purpose (see :mod:`.median`). It cannot stream: the round state is an
:class:`~trainer.aggregate.UpdateBuffer` of at most ``capacity`` updates, processed
column block by column block.
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
    require_fraction,
    require_positive,
)


def trim_count(n: int, beta: float) -> int:
    """Values dropped from each end: ``floor(beta * n)``."""
    return int(np.floor(beta * n))


def trimmed_mean(updates: F32Array | F64Array, beta: float) -> F64Array:
    """Trimmed mean over axis 0 of an ``(n, dim)`` matrix, in FP64."""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"need an (n >= 1, dim) matrix, got shape {updates.shape}")
    n = updates.shape[0]
    k = trim_count(n, beta)
    if 2 * k >= n:
        raise ValueError(f"trimming {k} from each end of {n} values leaves none")
    data = updates.astype(np.float64)
    if k:
        data = np.partition(data, (k, n - k - 1), axis=0)
    out: F64Array = np.mean(data[k : n - k], axis=0)
    return out


class TrimmedMean(StatelessMixin):
    """Trimmed mean (``beta`` per side) of at most ``capacity`` updates per round."""

    name: ClassVar[str] = "trimmed_mean"
    streams: ClassVar[bool] = False

    def __init__(self, *, beta: float = 0.1, capacity: int = 64, server_lr: float = 1.0) -> None:
        self.beta = require_fraction(self.name, "beta", beta, high=0.5)
        if int(capacity) < 1:
            raise StrategyConfigError(self.name, "capacity", f"must be >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.server_lr = require_positive(self.name, "server_lr", server_lr)

    def options(self) -> dict[str, OptionValue]:
        return {"beta": self.beta, "capacity": self.capacity, "server_lr": self.server_lr}

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        return UpdateBuffer(dim, self.capacity, round_id)

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        return expect_buffer(state, self.name).fold(update, weight)

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        buf = expect_buffer(state, self.name)
        check_round(buf, global_params, self.name)
        out = np.empty(buf.dim, dtype=np.float64)
        for start, stop, block in buf.column_blocks():
            out[start:stop] = trimmed_mean(block, self.beta)
        return apply_step(global_params, out, self.server_lr)
