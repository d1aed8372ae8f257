"""The default federated recipe: server strategy plus local training settings.

One place for the trainer (which strategy to build), the edge (how to fine-tune
locally; the edge keeps a copy of these numbers and of ``proximal_term``) and
``benchmarks/fl_quality.py`` (which checks the recipe against centralised training).
Tuned on digits split across 5 edges with a Dirichlet(0.3) label skew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.strategies import get_strategy
from trainer.strategies.base import Strategy


@dataclass(frozen=True)
class LocalRecipe:
    """How an edge fine-tunes per round: plain SGD with momentum over its own samples.

    ``proximal_mu`` > 0 adds FedProx's ``proximal_term`` to the loss. A fresh optimiser
    (zero momentum) is built each round.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0


DEFAULT_STRATEGY = "fedavgm"
"""FedAvg with server momentum: on the skewed digits split it reached, over seeds 0-5,
0.995-1.01 of centralised accuracy after 20 rounds and 95% of it by round 6-9, where
plain FedAvg reached 0.95 and needed 16-20 rounds, with the same local training."""
DEFAULT_STRATEGY_OPTIONS: dict[str, Any] = {"eta": 2.0, "momentum": 0.7}
DEFAULT_LOCAL = LocalRecipe()
"""One local epoch per round, SGD lr 0.05, momentum 0.9, batch 32."""


def default_strategy() -> Strategy:
    """A fresh instance of the default strategy with its default options."""
    return get_strategy(DEFAULT_STRATEGY, **DEFAULT_STRATEGY_OPTIONS)
