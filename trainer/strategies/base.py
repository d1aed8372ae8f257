"""The interface every strategy implements, and the helpers they share.

A round goes ``state = strategy.start(dim)``, then ``strategy.fold(state, update,
weight)`` once per accepted update (in arrival order, as updates come in), then
``new_global = strategy.finalize(state, global_params)``. Updates are FP32 deltas
(edge weights minus the global version they trained from); weights are the edge's
example counts, times any staleness discount the round engine applies.

Strategies with server-side optimiser state (FedAdam & co.) expose it as named NumPy
arrays through ``server_state`` / ``load_server_state`` so a checkpoint can hold it
(``np.savez`` / ``np.load(allow_pickle=False)``; no pickle).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from trainer.aggregate import F32Array, F64Array, UpdateBuffer, WeightedSum
from trainer.errors import AggregationError, StrategyConfigError

RoundState: TypeAlias = WeightedSum | UpdateBuffer
OptionValue: TypeAlias = float | int | str
ServerState: TypeAlias = dict[str, npt.NDArray[np.float64]]


class Strategy(Protocol):
    """What the trainer's round engine needs from an aggregation strategy."""

    name: ClassVar[str]
    streams: ClassVar[bool]
    """True when the round state's memory does not depend on the number of updates."""

    def start(self, dim: int, *, round_id: str = "") -> RoundState:
        """A fresh, empty state for one round over ``dim`` parameters."""
        ...

    def fold(self, state: RoundState, update: F32Array, weight: float) -> float:
        """Fold one update in; returns its L2 norm. Raises ``UpdateRejected``."""
        ...

    def finalize(self, state: RoundState, global_params: F32Array) -> F32Array:
        """The next global parameters (a new FP32 vector). Raises ``AggregationError``."""
        ...

    def options(self) -> dict[str, OptionValue]:
        """The strategy's settings, for logs and lineage."""
        ...

    def server_state(self) -> ServerState:
        """Optimiser state carried across rounds (empty for stateless strategies)."""
        ...

    def load_server_state(self, state: Mapping[str, npt.NDArray[np.float64]]) -> None:
        """Restore what :meth:`server_state` returned."""
        ...

    def epsilon_spent(self) -> float | None:
        """Epsilon the model has spent so far under central DP, as the strategy's privacy
        ledger says (None: the strategy keeps no privacy ledger)."""
        ...


def expect_sum(state: RoundState, strategy: str) -> WeightedSum:
    """Narrow a round state to :class:`WeightedSum` or raise ``wrong-state``."""
    if not isinstance(state, WeightedSum):
        raise AggregationError(
            "wrong-state", f"{strategy} needs a WeightedSum state, got {type(state).__name__}"
        )
    return state


def expect_buffer(state: RoundState, strategy: str) -> UpdateBuffer:
    """Narrow a round state to :class:`UpdateBuffer` or raise ``wrong-state``."""
    if not isinstance(state, UpdateBuffer):
        raise AggregationError(
            "wrong-state", f"{strategy} needs an UpdateBuffer state, got {type(state).__name__}"
        )
    return state


def check_round(state: RoundState, global_params: F32Array, strategy: str) -> None:
    """A round can finalise only with at least one update and a matching global vector."""
    if state.spent:
        raise AggregationError("round-spent", f"{strategy}: this round was finalized already")
    if state.count == 0:
        raise AggregationError("empty-round", f"{strategy}: no update was folded this round")
    if global_params.ndim != 1 or global_params.size != state.dim:
        raise AggregationError(
            "wrong-size",
            f"{strategy}: global parameters have shape {global_params.shape}, "
            f"the round has {state.dim}",
        )


def apply_step(global_params: F32Array, step: F64Array, lr: float = 1.0) -> F32Array:
    """``global + lr * step`` computed in FP64, returned as a new FP32 vector.

    ``step`` is consumed: it is scaled and added to in place (callers pass a fresh one).
    """
    if lr != 1.0:
        step *= lr
    step += global_params
    return step.astype(np.float32)


def require_positive(strategy: str, option: str, value: float) -> float:
    """``value`` as a float; it must be finite and > 0."""
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise StrategyConfigError(strategy, option, f"must be a finite number > 0, got {value!r}")
    return v


def require_fraction(
    strategy: str, option: str, value: float, *, low: float = 0.0, high: float = 1.0
) -> float:
    """``value`` as a float in ``[low, high)``."""
    v = float(value)
    if not (math.isfinite(v) and low <= v < high):
        raise StrategyConfigError(strategy, option, f"must lie in [{low}, {high}), got {value!r}")
    return v


class NoAccounting:
    """``epsilon_spent`` for strategies that keep no privacy ledger."""

    def epsilon_spent(self) -> float | None:
        return None


class StatelessMixin(NoAccounting):
    """``server_state`` / ``load_server_state`` for strategies with nothing to carry."""

    def server_state(self) -> ServerState:
        return {}

    def load_server_state(self, state: Mapping[str, npt.NDArray[np.float64]]) -> None:
        if state:
            raise AggregationError(
                "wrong-state",
                f"{type(self).__name__} keeps no server state, got keys {sorted(state)}",
            )
