"""Streaming aggregation: fold each accepted update into a running state as it arrives.

An update is a flat little-endian FP32 vector: the edge's weights minus the global
version it trained from. Two round states exist:

- :class:`WeightedSum` streams. It holds a running weighted sum in preallocated buffers
  (an FP32 block accumulator flushed into an FP64 total every ``FLUSH_EVERY`` updates,
  plus a 1 MiB FP32 scratch slice), a count and a total weight. Folding an update is one
  validation pass (its squared norm, which also catches NaN and Inf) and two in-place
  vector operations per slice; nothing is allocated per update, so memory is about
  ``12 * dim`` bytes whatever the number of updates. FedAvg, FedProx, FedAvgM, FedAdam, FedYogi,
  FedAdagrad, norm clipping and central DP all reduce to a weighted mean and use it.
- :class:`UpdateBuffer` does not stream. Coordinate-wise median and trimmed mean need
  every value of a coordinate at once, so no constant-size running state computes them
  exactly. The buffer keeps copies of at most ``capacity`` updates (memory
  ``<= 4 * capacity * dim`` bytes, bounded but not constant) and refuses the next one
  with ``buffer-full``; the robust rules then work column block by column block so
  their temporaries stay small.

Both validate before they touch their state: a rejected update leaves the round
exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from trainer.errors import UpdateRejected

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]

UPDATE_DTYPE = np.dtype("<f4")
"""The wire dtype of an update: little-endian IEEE 754 binary32."""

MAX_WEIGHT = 1e12
"""Largest accepted weight: keeps ``weight * value`` finite in the FP32 block sum."""

FLUSH_EVERY = 16
SCRATCH_VALUES = 1 << 18
"""Values of the update scaled at a time (1 MiB of FP32)."""
"""Updates summed in FP32 before the block is added to the FP64 total."""

COLUMN_BLOCK = 1 << 15
"""Coordinates per block when robust rules walk a buffer."""


def decode_update(data: bytes | bytearray | memoryview, dim: int) -> F32Array:
    """Bytes of ``dim`` little-endian FP32 values -> a read-only vector (zero-copy).

    Raises :class:`UpdateRejected` (``wrong-size``) when the length does not match.
    """
    nbytes = memoryview(data).nbytes
    if nbytes != dim * UPDATE_DTYPE.itemsize:
        raise UpdateRejected(
            "wrong-size",
            f"update has {nbytes} bytes, expected {dim * UPDATE_DTYPE.itemsize} "
            f"({dim} float32 values)",
        )
    return np.frombuffer(data, dtype=UPDATE_DTYPE)


def update_norm(update: npt.NDArray[Any], dim: int) -> float:
    """Validate one update and return its L2 norm.

    Rejects (:class:`UpdateRejected`) a vector that is not 1-D FP32 of length ``dim``
    (``wrong-dtype``, ``wrong-size``) or holds NaN or Inf (``non-finite``; also when its
    squared norm overflows FP32, i.e. some value beyond about 1.8e19).
    """
    if update.dtype != np.float32:
        raise UpdateRejected("wrong-dtype", f"update dtype is {update.dtype}, expected float32")
    if update.ndim != 1 or update.size != dim:
        raise UpdateRejected("wrong-size", f"update has shape {update.shape}, expected ({dim},)")
    squared = float(np.dot(update, update))
    if not math.isfinite(squared):
        raise UpdateRejected(
            "non-finite", "update holds NaN or Inf, or its squared norm overflows float32"
        )
    return math.sqrt(squared)


def check_weight(weight: float) -> float:
    """A weight must be finite, positive and at most :data:`MAX_WEIGHT`."""
    w = float(weight)
    if not (math.isfinite(w) and 0.0 < w <= MAX_WEIGHT):
        raise UpdateRejected("bad-weight", f"weight {weight!r} is not in (0, {MAX_WEIGHT:g}]")
    return w


def clip_factor(norm: float, max_norm: float | None) -> float:
    """``min(1, max_norm / norm)``: the scale that brings a vector's norm to at most
    ``max_norm`` (1 when ``max_norm`` is ``None`` or the norm is already within it)."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / norm


class WeightedSum:
    """Running ``sum_i weight_i * scale_i * update_i``, count and total weight.

    Memory: ``12 * dim`` bytes and a 1 MiB scratch slice, allocated once, independent of
    how many updates are folded; :meth:`reset` reuses them for the next round.
    ``round_id`` labels the round (logs, the privacy ledger).
    """

    round_id: str
    count: int
    total_weight: float
    sensitivity: float | None
    """Set by :meth:`fold_sum`: the L2 bound on one edge's part of a pre-aggregated sum."""

    def __init__(self, dim: int, round_id: str = "") -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        # Written here, not lazily zeroed by the OS, so the first folds pay no page faults.
        self._block = np.empty(dim, dtype=np.float32)
        self._total = np.empty(dim, dtype=np.float64)
        # one slice of the update at a time: a large model's update is not copied whole
        self._scratch = np.empty(min(dim, SCRATCH_VALUES), dtype=np.float32)
        self._scratch.fill(0.0)
        self.reset(round_id)

    def reset(self, round_id: str = "") -> None:
        """Empty the state for a new round, keeping its buffers."""
        self.round_id = round_id
        self.count = 0
        self.total_weight = 0.0
        self.sensitivity = None
        self._block.fill(0.0)
        self._total.fill(0.0)
        self._in_block = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator buffers."""
        return self._block.nbytes + self._total.nbytes + self._scratch.nbytes

    def fold(self, update: F32Array, weight: float, *, max_norm: float | None = None) -> float:
        """Add ``weight * clip_factor * update``; returns the update's norm before clipping.

        ``weight`` counts toward :attr:`total_weight` unscaled, so the mean of clipped
        updates stays a weighted mean. Raises :class:`UpdateRejected` and leaves the
        state unchanged when the update or weight is invalid.
        """
        norm = update_norm(update, self.dim)
        w = check_weight(weight)
        coeff = np.float32(w * clip_factor(norm, max_norm))
        step = self._scratch.size
        for at in range(0, self.dim, step):
            end = min(at + step, self.dim)
            scratch = self._scratch[: end - at]
            np.multiply(update[at:end], coeff, out=scratch)
            np.add(self._block[at:end], scratch, out=self._block[at:end])
        self._in_block += 1
        self.count += 1
        self.total_weight += w
        if self._in_block >= FLUSH_EVERY:
            self._flush()
        return norm

    def fold_sum(self, total: F64Array, count: int, *, sensitivity: float) -> None:
        """Add the sum of ``count`` equally weighted updates, summed elsewhere (secure
        aggregation: the trainer never sees them one by one, so none is clipped here).

        ``sensitivity`` bounds the L2 norm of any one of them (the edges' clip plus the
        quantisation error); central DP calibrates its noise to it. Raises
        :class:`UpdateRejected` and leaves the state unchanged when the sum is invalid.
        """
        vector = np.asarray(total, dtype=np.float64)
        if vector.ndim != 1 or vector.size != self.dim:
            raise UpdateRejected(
                "wrong-size", f"sum has shape {vector.shape}, expected ({self.dim},)"
            )
        if not np.isfinite(vector).all():
            raise UpdateRejected("non-finite", "the aggregated sum holds NaN or Inf")
        if count < 1 or not (math.isfinite(sensitivity) and sensitivity > 0):
            raise UpdateRejected("bad-weight", f"count {count} and sensitivity {sensitivity}")
        self._flush()
        np.add(self._total, vector, out=self._total)
        self.count += count
        self.total_weight += float(count)
        self.sensitivity = max(self.sensitivity or 0.0, float(sensitivity))

    def _flush(self) -> None:
        np.add(self._total, self._block, out=self._total)
        self._block.fill(0.0)
        self._in_block = 0

    def weighted_sum(self) -> F64Array:
        """The running weighted sum (a new FP64 vector)."""
        self._flush()
        return self._total.copy()

    def mean(self) -> F64Array:
        """Weighted mean ``sum / total_weight`` (a new FP64 vector); needs one update."""
        if self.count == 0:
            raise ValueError("mean of an empty WeightedSum")
        total = self.weighted_sum()
        total /= self.total_weight
        return total

    def snapshot(self) -> dict[str, F64Array]:
        """The state as named FP64 arrays, for a checkpoint (``np.savez``, no pickle).
        ``sum`` is the live accumulator, not a copy (a large model's is twice its size):
        write it out before the next fold."""
        self._flush()
        return {
            "sum": self._total,
            "count": np.array([float(self.count)]),
            "total_weight": np.array([self.total_weight]),
        }

    @classmethod
    def restore(cls, arrays: Mapping[str, npt.NDArray[Any]], round_id: str = "") -> WeightedSum:
        """A state rebuilt from :meth:`snapshot`; ``ValueError`` if the arrays do not fit."""
        total = np.asarray(arrays["sum"], dtype=np.float64)
        count = float(np.asarray(arrays["count"]).reshape(-1)[0])
        weight = float(np.asarray(arrays["total_weight"]).reshape(-1)[0])
        if total.ndim != 1 or count < 0 or count != int(count) or not math.isfinite(weight):
            raise ValueError("snapshot is not a WeightedSum state")
        if not np.isfinite(total).all():
            raise ValueError("snapshot sum holds NaN or Inf")
        state = cls(total.size, round_id)
        state._total[:] = total
        state.count = int(count)
        state.total_weight = weight
        return state


class UpdateBuffer:
    """Copies of at most ``capacity`` updates and their weights (bounded, not streaming).

    Memory grows with the updates held, up to ``4 * capacity * dim`` bytes; the update
    after that is refused with ``buffer-full`` instead of growing further.
    """

    def __init__(self, dim: int, capacity: int, round_id: str = "") -> None:
        if dim < 1 or capacity < 1:
            raise ValueError(f"dim and capacity must be positive, got {dim}, {capacity}")
        self.dim = dim
        self.capacity = capacity
        self.round_id = round_id
        self._rows: list[F32Array] = []
        self._weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self._rows)

    @property
    def total_weight(self) -> float:
        return math.fsum(self._weights)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(self._weights)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._rows)

    def fold(self, update: F32Array, weight: float) -> float:
        """Keep a copy of ``update``; returns its norm. Refuses past ``capacity``."""
        if len(self._rows) >= self.capacity:
            raise UpdateRejected(
                "buffer-full", f"this round already holds {self.capacity} updates (its capacity)"
            )
        norm = update_norm(update, self.dim)
        w = check_weight(weight)
        self._rows.append(np.array(update, dtype=np.float32, copy=True))
        self._weights.append(w)
        return norm

    def column_blocks(self, block: int = COLUMN_BLOCK) -> Iterator[tuple[int, int, F32Array]]:
        """``(start, stop, matrix)`` with ``matrix[i] = update_i[start:stop]`` per block."""
        for start in range(0, self.dim, block):
            stop = min(start + block, self.dim)
            yield start, stop, np.stack([r[start:stop] for r in self._rows])
