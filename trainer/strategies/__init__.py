"""Aggregation strategies, one per module, picked by name from the trainer's settings.

>>> strategy = get_strategy("fedadam", eta=0.01)
>>> state = strategy.start(dim)
>>> strategy.fold(state, update, weight)          # once per accepted update
>>> new_global = strategy.finalize(state, global_params)

Names: ``fedavg``, ``fedprox``, ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``,
``median``, ``trimmed_mean``, ``krum`` (Multi-Krum), ``clipping``, ``dp_fedavg``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from trainer.errors import StrategyConfigError, UnknownStrategyError
from trainer.strategies.base import RoundState, Strategy
from trainer.strategies.clipping import NormClipping
from trainer.strategies.dp import DPFedAvg
from trainer.strategies.fedavg import FedAvg
from trainer.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from trainer.strategies.fedprox import FedProx
from trainer.strategies.krum import MultiKrum
from trainer.strategies.median import Median
from trainer.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Median,
        TrimmedMean,
        MultiKrum,
        NormClipping,
        DPFedAvg,
    )
}


def strategy_names() -> tuple[str, ...]:
    """Every name :func:`get_strategy` accepts."""
    return tuple(sorted(STRATEGIES))


def get_strategy(name: str, **options: Any) -> Strategy:
    """A new strategy by name (case-insensitive, ``-`` or ``_``) with keyword options.

    Raises :class:`UnknownStrategyError` for an unknown name and
    :class:`StrategyConfigError` for an unknown, missing or out-of-range option.
    """
    key = name.strip().lower().replace("-", "_")
    factory = STRATEGIES.get(key)
    if factory is None:
        raise UnknownStrategyError(name, strategy_names())
    params = inspect.signature(factory).parameters
    for option in options:
        if option not in params:
            known = ", ".join(p for p in params if p != "self")
            raise StrategyConfigError(key, option, f"unknown option; known: {known}")
    for p in params.values():
        if p.default is inspect.Parameter.empty and p.name not in options:
            raise StrategyConfigError(key, p.name, "required option is missing")
    return factory(**options)


__all__ = [
    "STRATEGIES",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Median",
    "MultiKrum",
    "NormClipping",
    "RoundState",
    "Strategy",
    "TrimmedMean",
    "get_strategy",
    "strategy_names",
]
