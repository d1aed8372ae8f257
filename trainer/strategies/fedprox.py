"""FedProx (Li et al., 2020): FedAvg on the server, a proximal term in local training.

Each edge minimises ``loss + proximal_term(local, global, mu)``
(:func:`fedcore.modelrun.proximal_term`) so its weights cannot drift far from the global
version on skewed local data; ``mu`` travels to the edges with the round's recipe.
On the server FedProx aggregates exactly as FedAvg does (streaming, sample-weighted).
"""

from __future__ import annotations

from typing import ClassVar

from trainer.strategies.base import OptionValue, require_fraction
from trainer.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg aggregation; ``mu`` is the proximal coefficient for local training."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, mu: float = 0.01, server_lr: float = 1.0) -> None:
        super().__init__(server_lr=server_lr)
        self.mu = require_fraction(self.name, "mu", mu, high=float("inf"))

    def options(self) -> dict[str, OptionValue]:
        return {"mu": self.mu, "server_lr": self.server_lr}
