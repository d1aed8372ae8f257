"""Multi-Krum (Blanchard et al., NeurIPS 2017): average the updates closest to their peers.

With ``n`` updates of which at most ``f`` (``byzantine``) are arbitrary, update ``i``
scores ``s(i)``, the sum of its squared L2 distances to its ``n - f - 2`` nearest other
updates. Krum keeps the update with the lowest score; Multi-Krum averages the ``m``
lowest-scoring ones (``keep``; 0 means ``m = n - f``, 1 is plain Krum). The guarantee
(the output stays within a bounded distance of the honest updates' mean whatever the
``f`` others send) needs ``n > 2f + 2``: :meth:`MultiKrum.finalize` refuses a round with
fewer updates (``too-few-updates``), so set the round's ``MIN_UPDATES`` to at least
``2f + 3``. Ties in score go to the earlier update (stable order). Weights are ignored on
purpose, as in :mod:`.median`: a self-reported example count must not buy influence.

Memory. Krum needs every pairwise distance, so it cannot stream: the round state is an
:class:`~trainer.aggregate.UpdateBuffer` of at most ``capacity`` updates, ``4 * n * d``
bytes for ``n`` updates of ``d`` parameters (O(n * d); 256 MiB for 64 updates of 1M
parameters), plus an ``n x n`` FP64 distance matrix and, while distances are summed
column block by column block, an ``n x block`` FP64 temporary (block = 32,768
coordinates: 16 MiB at ``n`` = 64). Time is O(n^2 * d). ``capacity`` bounds ``n``: at most
:data:`MAX_CAPACITY`, and the buffer refuses the update after ``capacity``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from trainer.aggregate import COLUMN_BLOCK, F32Array, F64Array, UpdateBuffer
from trainer.errors import AggregationError, StrategyConfigError
from trainer.strategies.base import (
    OptionValue,
    RoundState,
    StatelessMixin,
    apply_step,
    check_round,
    expect_buffer,
    require_positive,
)

log = logging.getLogger(__name__)

MAX_CAPACITY = 1024
"""Largest ``capacity`` accepted: bounds the buffer (``4 * capacity * d`` bytes)."""

IntArray = npt.NDArray[np.intp]


def min_updates(byzantine: int) -> int:
    """The fewest updates Krum's bound holds for: ``2f + 3`` (``n > 2f + 2``)."""
    return 2 * byzantine + 3


def add_sq_distances(dist: F64Array, block: F32Array | F64Array) -> None:
    """Add the squared distances between the rows of ``block`` (``n x b``) to ``dist``
    (``n x n``), in FP64: ``|a|^2 + |b|^2 - 2 a.b``, rounding below zero cut to 0."""
    rows = block.astype(np.float64)
    sq = np.einsum("ij,ij->i", rows, rows)
    part = sq[:, None] + sq[None, :] - 2.0 * (rows @ rows.T)
    np.maximum(part, 0.0, out=part)
    np.fill_diagonal(part, 0.0)
    dist += part


def pairwise_sq_distances(updates: F32Array | F64Array) -> F64Array:
    """Squared L2 distances between the rows of an ``(n, d)`` matrix (``n x n``, FP64)."""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"need an (n >= 1, dim) matrix, got shape {updates.shape}")
    n = updates.shape[0]
    dist = np.zeros((n, n), dtype=np.float64)
    for start in range(0, updates.shape[1], COLUMN_BLOCK):
        add_sq_distances(dist, updates[:, start : start + COLUMN_BLOCK])
    return dist


def krum_scores(dist: F64Array, byzantine: int) -> F64Array:
    """Each update's sum of squared distances to its ``n - f - 2`` nearest others."""
    n = dist.shape[0]
    if n < min_updates(byzantine):
        raise ValueError(f"Krum with f={byzantine} needs n >= {min_updates(byzantine)}, got {n}")
    neighbours = n - byzantine - 2
    others = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)[:, :neighbours]
    scores: F64Array = others.sum(axis=1)
    return scores


def krum_select(dist: F64Array, byzantine: int, keep: int) -> IntArray:
    """Indices (ascending) of the ``keep`` lowest-scoring updates; 0 keeps ``n - f``."""
    scores = krum_scores(dist, byzantine)
    m = keep or dist.shape[0] - byzantine
    if not 1 <= m <= dist.shape[0]:
        raise ValueError(f"cannot keep {m} of {dist.shape[0]} updates")
    order: IntArray = np.argsort(scores, kind="stable")
    return np.sort(order[:m])


def multi_krum(updates: F32Array | F64Array, byzantine: int, keep: int = 0) -> F64Array:
    """Batch reference: the mean (FP64) of the updates Multi-Krum keeps."""
    picked = krum_select(pairwise_sq_distances(updates), byzantine, keep)
    out: F64Array = updates[picked].astype(np.float64).mean(axis=0)
    return out


class MultiKrum(StatelessMixin):
    """Average the ``keep`` updates (default ``n - byzantine``) with the lowest Krum score."""

    name: ClassVar[str] = "krum"
    streams: ClassVar[bool] = False

    def __init__(
        self, *, byzantine: int = 1, keep: int = 0, capacity: int = 64, server_lr: float = 1.0
    ) -> None:
        if int(byzantine) < 0 or int(byzantine) != byzantine:
            raise StrategyConfigError(self.name, "byzantine", f"must be >= 0, got {byzantine!r}")
        self.byzantine = int(byzantine)
        if not 1 <= int(capacity) <= MAX_CAPACITY or int(capacity) < min_updates(self.byzantine):
            raise StrategyConfigError(
                self.name,
                "capacity",
                f"must lie in [{min_updates(self.byzantine)}, {MAX_CAPACITY}] "
                f"(2 * byzantine + 3 updates at least), got {capacity!r}",
            )
        self.capacity = int(capacity)
        if not 0 <= int(keep) <= self.capacity:
            raise StrategyConfigError(
                self.name, "keep", f"must lie in [0, capacity]; 0 keeps n - byzantine, got {keep!r}"
            )
        self.keep = int(keep)
        self.server_lr = require_positive(self.name, "server_lr", server_lr)

    @property
    def min_round_updates(self) -> int:
        """Updates a round needs before it may close (the trainer checks its quorum)."""
        return min_updates(self.byzantine)

    def options(self) -> dict[str, OptionValue]:
        return {
            "byzantine": self.byzantine,
            "keep": self.keep,
            "capacity": self.capacity,
            "server_lr": self.server_lr,
        }

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        return UpdateBuffer(dim, self.capacity, round_id)

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        return expect_buffer(state, self.name).fold(update, weight)

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        buf = expect_buffer(state, self.name)
        check_round(buf, global_params, self.name)
        n, need = buf.count, min_updates(self.byzantine)
        if n < need:
            raise AggregationError(
                "too-few-updates",
                f"{self.name}: {n} updates, Krum with byzantine={self.byzantine} needs {need}",
            )
        if self.keep > n:
            raise AggregationError(
                "too-few-updates", f"{self.name}: keep={self.keep} but only {n} updates"
            )
        dist = np.zeros((n, n), dtype=np.float64)
        for _, _, block in buf.column_blocks():
            add_sq_distances(dist, block)
        picked = krum_select(dist, self.byzantine, self.keep)
        out = np.zeros(buf.dim, dtype=np.float64)
        for start, stop, block in buf.column_blocks():
            out[start:stop] = block[picked].astype(np.float64).mean(axis=0)
        log.info(
            "krum kept %d of %d updates",
            picked.size,
            n,
            extra={"round_id": buf.round_id, "kept": picked.tolist()},
        )
        return apply_step(global_params, out, self.server_lr)
