"""Streaming aggregation: fold each accepted update into a running state as it arrives.

An update is a flat little-endian FP32 vector: the edge's weights minus the global
version it trained from. Two round states exist:

- :class:`WeightedSum` streams. It holds a running weighted sum in preallocated buffers
  (an FP32 sum and its FP32 Kahan compensation, plus two 1 MiB FP32 scratch slices), a
  count and a total weight. Folding an update is one validation pass (its squared norm,
  which also catches NaN and Inf) and a few in-place vector operations per slice; nothing
  is allocated per update, so memory is about ``8 * dim`` bytes whatever the number of
  updates. The compensated sum carries about twice FP32's precision (``sum - compensation``
  read in FP64), so the mean matches an FP64 reference to well below FP32's rounding.
  FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, norm clipping and central DP
  all reduce to a weighted mean and use it.
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
import mmap
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.pages import FilePages, file_pages
from trainer.errors import AggregationError, UpdateRejected

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]

MAX_WEIGHT = 1e12
"""Largest accepted weight: keeps ``weight * value`` finite in the FP32 block sum."""

SCRATCH_VALUES = 1 << 18
"""Values of the update scaled at a time (1 MiB of FP32)."""

COLUMN_BLOCK = 1 << 15
"""Coordinates per block when robust rules walk a buffer."""


def mapped_zeros(size: int) -> F32Array:
    """A zeroed FP32 vector in its own anonymous mapping, given back to the system as soon
    as it is dropped, whatever its size: a heap block is not (glibc's mmap threshold grows
    to 32 MiB after a large block is freed, and freed heap memory mostly stays in the
    process)."""
    buffer = mmap.mmap(-1, max(size, 1) * 4)
    out: F32Array = np.frombuffer(buffer, dtype=np.float32, count=size)
    return out


def update_norm(update: npt.NDArray[Any], dim: int, pages: FilePages | None = None) -> float:
    """Validate one update and return its L2 norm.

    Rejects (:class:`UpdateRejected`) a vector that is not 1-D FP32 of length ``dim``
    (``wrong-dtype``, ``wrong-size``) or holds NaN or Inf (``non-finite``; also when its
    squared norm overflows FP32, i.e. some value beyond about 1.8e19). With ``pages``
    (``update`` maps a file) it is read a slice at a time, each slice's pages dropped.
    """
    if update.dtype != np.float32:
        raise UpdateRejected("wrong-dtype", f"update dtype is {update.dtype}, expected float32")
    if update.ndim != 1 or update.size != dim:
        raise UpdateRejected("wrong-size", f"update has shape {update.shape}, expected ({dim},)")
    if pages is None:
        squared = float(np.dot(update, update))
    else:
        squared = 0.0
        for at in range(0, dim, SCRATCH_VALUES):
            part = update[at : at + SCRATCH_VALUES]
            squared += float(np.dot(part, part))
            pages.drop(at + part.size)
        squared = squared if squared <= FLOAT32_MAX else math.inf
    if not math.isfinite(squared):
        raise UpdateRejected(
            "non-finite", "update holds NaN or Inf, or its squared norm overflows float32"
        )
    return math.sqrt(squared)


FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def scale_step(candidate: npt.NDArray[Any], base: npt.NDArray[Any], scale: float) -> F32Array:
    """``base + scale * (candidate - base)`` in FP32, the same operations bit for bit as
    on whole vectors, written into ``candidate`` (when it is a writable FP32 vector of its
    own) a slice at a time: no step and scaled step of the model's size each. A ``base``
    mapped from its file gives its pages back as it is read."""
    own = (
        candidate.dtype == np.float32
        and candidate.flags.writeable
        and not np.may_share_memory(candidate, base)
    )
    out: F32Array = candidate if own else np.array(candidate, dtype=np.float32)
    factor, pages = np.float32(scale), file_pages(base)
    for at in range(0, out.size, SCRATCH_VALUES):
        end = min(at + SCRATCH_VALUES, out.size)
        part, below = out[at:end], np.asarray(base[at:end], dtype=np.float32)
        np.subtract(part, below, out=part)
        np.multiply(factor, part, out=part)
        np.add(below, part, out=part)
        if pages is not None:
            pages.drop(end)
    return out


class WeightedSum:
    """Running ``sum_i weight_i * scale_i * update_i``, count and total weight.

    The sum is Kahan-compensated in FP32: ``_sum - _comp`` (read in FP64) is the exact
    running sum up to about ``2**-46`` relative, FP64's accuracy for the few dozen updates
    of a round, at 8 bytes a parameter instead of an FP64 total's 8 plus a block's 4.
    Memory: ``8 * dim`` bytes and two 1 MiB scratch slices, allocated once, independent of
    how many updates are folded; :meth:`reset` reuses them for the next round.
    ``round_id`` (:func:`fedcore.wire.round_id`) labels the round (logs, the privacy ledger).
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
        # Own mappings, so discard() gives them back; written in reset(), so the first
        # folds pay no page faults.
        self._sum = mapped_zeros(dim)
        self._comp = mapped_zeros(dim)
        # one slice of the update at a time: a large model's update is not copied whole
        self._scratch = np.zeros((2, min(dim, SCRATCH_VALUES)), dtype=np.float32)
        self.reset(round_id)

    def reset(self, round_id: str = "") -> None:
        """Empty the state for a new round, keeping its buffers."""
        self.round_id = round_id
        self.count = 0
        self.total_weight = 0.0
        self.sensitivity = None
        self._sum.fill(0.0)
        self._comp.fill(0.0)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator buffers."""
        return self._sum.nbytes + self._comp.nbytes + self._scratch.nbytes

    @property
    def spent(self) -> bool:
        """True once :meth:`discard` gave the buffers back."""
        return self._sum.size != self.dim

    def discard(self) -> None:
        """Give the buffers back once the round's candidate is computed: the sum is 2x the
        model and the release gate, export and upload that follow do not read it (a
        restart resumes the round from its checkpoint on disk, not from memory). Any later
        use of the sum raises ``AggregationError("round-spent")``."""
        self._sum = self._comp = np.zeros(0, dtype=np.float32)
        self._scratch = np.zeros((2, 0), dtype=np.float32)

    def _live(self) -> None:
        if self.spent:
            raise AggregationError(
                "round-spent", f"round {self.round_id or '?'}: its sum was discarded"
            )

    def fold(self, update: F32Array, weight: float, *, max_norm: float | None = None) -> float:
        """Add ``weight * clip_factor * update``; returns the update's norm before clipping.

        ``weight`` counts toward :attr:`total_weight` unscaled, so the mean of clipped
        updates stays a weighted mean. Raises :class:`UpdateRejected` and leaves the
        state unchanged when the update or weight is invalid.
        """
        self._live()
        norm = update_norm(update, self.dim, file_pages(update))
        pages = file_pages(update)  # a second pass over a spilled update: dropped again
        w = check_weight(weight)
        coeff = np.float32(w * clip_factor(norm, max_norm))
        step = self._scratch.shape[1]
        for at in range(0, self.dim, step):
            end = min(at + step, self.dim)
            y, t = self._scratch[0, : end - at], self._scratch[1, : end - at]
            s, c = self._sum[at:end], self._comp[at:end]
            # Kahan: y = term - c; t = s + y; c = (t - s) - y; s = t (numpy: no FMA)
            np.multiply(update[at:end], coeff, out=y)
            np.subtract(y, c, out=y)
            np.add(s, y, out=t)
            np.subtract(t, s, out=c)
            np.subtract(c, y, out=c)
            s[:] = t
            if pages is not None:
                pages.drop(end)
        self.count += 1
        self.total_weight += w
        return norm

    def fold_sum(self, total: F64Array, count: int, *, sensitivity: float) -> None:
        """Add the sum of ``count`` equally weighted updates, summed elsewhere (secure
        aggregation: the trainer never sees them one by one, so none is clipped here).

        ``sensitivity`` bounds the L2 norm of any one of them (the edges' clip plus the
        quantisation error); central DP calibrates its noise to it. Raises
        :class:`UpdateRejected` and leaves the state unchanged when the sum is invalid.
        """
        self._live()
        vector = np.asarray(total, dtype=np.float64)
        if vector.ndim != 1 or vector.size != self.dim:
            raise UpdateRejected(
                "wrong-size", f"sum has shape {vector.shape}, expected ({self.dim},)"
            )
        if not np.isfinite(vector).all():
            raise UpdateRejected("non-finite", "the aggregated sum holds NaN or Inf")
        if count < 1 or not (math.isfinite(sensitivity) and sensitivity > 0):
            raise UpdateRejected("bad-weight", f"count {count} and sensitivity {sensitivity}")
        self._add_exact(vector)
        self.count += count
        self.total_weight += float(count)
        self.sensitivity = max(self.sensitivity or 0.0, float(sensitivity))

    def _add_exact(self, vector: F64Array) -> None:
        """Add an FP64 vector to the compensated sum, a slice at a time in FP64."""
        step = self._scratch.shape[1]
        for at in range(0, self.dim, step):
            end = min(at + step, self.dim)
            exact = self._sum[at:end].astype(np.float64)
            exact -= self._comp[at:end]
            exact += vector[at:end]
            self._sum[at:end] = exact
            self._comp[at:end] = self._sum[at:end] - exact

    def weighted_sum(self) -> F64Array:
        """The running weighted sum (a new FP64 vector)."""
        self._live()
        total = self._sum.astype(np.float64)
        total -= self._comp
        return total

    def mean(self) -> F64Array:
        """Weighted mean ``sum / total_weight`` (a new FP64 vector); needs one update."""
        if self.count == 0:
            raise ValueError("mean of an empty WeightedSum")
        total = self.weighted_sum()
        total /= self.total_weight
        return total

    def step_onto(self, global_params: F32Array, lr: float = 1.0) -> F32Array:
        """``global + lr * mean`` as a new FP32 vector, computed in FP64 a slice at a time
        (the same operations as ``apply_step(global, mean(), lr)``, bit for bit, without
        the whole FP64 mean: a large model's is twice its size)."""
        if self.count == 0:
            raise ValueError("mean of an empty WeightedSum")
        self._live()
        out = np.empty(self.dim, dtype=np.float32)
        pages = file_pages(global_params)  # parameters read from disk stay there
        step = self._scratch.shape[1]
        for at in range(0, self.dim, step):
            end = min(at + step, self.dim)
            part = self._sum[at:end].astype(np.float64)
            part -= self._comp[at:end]
            part /= self.total_weight
            if lr != 1.0:
                part *= lr
            part += global_params[at:end]
            out[at:end] = part
            if pages is not None:
                pages.drop(end)
        return out

    def snapshot(self) -> dict[str, npt.NDArray[Any]]:
        """The state as named arrays, for a checkpoint (``np.savez``, no pickle).
        ``sum`` and ``compensation`` are the live FP32 accumulators, not copies: write them
        out before the next fold."""
        self._live()
        return {
            "sum": self._sum,
            "compensation": self._comp,
            "count": np.array([float(self.count)]),
            "total_weight": np.array([self.total_weight]),
        }

    @classmethod
    def restore(cls, arrays: Mapping[str, npt.NDArray[Any]], round_id: str = "") -> WeightedSum:
        """A state rebuilt from :meth:`snapshot` (or an FP64 ``sum`` without
        ``compensation``, as older checkpoints hold); ``ValueError`` if they do not fit."""
        total = np.asarray(arrays["sum"])
        count = float(np.asarray(arrays["count"]).reshape(-1)[0])
        weight = float(np.asarray(arrays["total_weight"]).reshape(-1)[0])
        if total.ndim != 1 or count < 0 or count != int(count) or not math.isfinite(weight):
            raise ValueError("snapshot is not a WeightedSum state")
        comp = np.asarray(arrays.get("compensation", np.zeros(total.size, dtype=np.float32)))
        if comp.shape != total.shape:
            raise ValueError("snapshot compensation does not match its sum")
        if not (np.isfinite(total).all() and np.isfinite(comp).all()):
            raise ValueError("snapshot sum holds NaN or Inf")
        state = cls(total.size, round_id)
        if total.dtype == np.float32:
            state._sum[:] = total
            state._comp[:] = comp
        else:
            state._add_exact(total.astype(np.float64) - comp)
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
        self.spent = False

    @property
    def count(self) -> int:
        return len(self._rows)

    def discard(self) -> None:
        """Give the copies back once the round's candidate is computed (as
        :meth:`WeightedSum.discard`); folding or reading blocks later raises ``round-spent``."""
        self._rows, self._weights, self.spent = [], [], True

    def _live(self) -> None:
        if self.spent:
            raise AggregationError(
                "round-spent", f"round {self.round_id or '?'}: its updates were discarded"
            )

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
        self._live()
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
        self._live()
        for start in range(0, self.dim, block):
            stop = min(start + block, self.dim)
            yield start, stop, np.stack([r[start:stop] for r in self._rows])
