"""FedProx (Li et al., 2020): FedAvg on the server, a proximal term in local training.

Each edge minimises ``loss + proximal_term(local, global, mu)`` so its weights cannot
drift far from the global version on skewed local data; ``mu`` travels to the edges
with the round's training settings. On the server FedProx aggregates exactly as
FedAvg does (streaming, sample-weighted).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from trainer.strategies.base import OptionValue, require_fraction
from trainer.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    import torch


def proximal_term(
    local: Iterable[torch.Tensor], global_: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """``mu / 2 * sum_k ||local_k - global_k||^2`` over paired tensors (differentiable).

    ``local`` are the trainable parameters, ``global_`` detached copies of the global
    version's, in the same order. Its gradient w.r.t. ``local_k`` is
    ``mu * (local_k - global_k)``.
    """
    total: torch.Tensor | None = None
    for w, g in zip(local, global_, strict=True):
        sq = (w - g.detach()).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("proximal_term needs at least one tensor pair")
    return total * (mu / 2.0)


class FedProx(FedAvg):
    """FedAvg aggregation; ``mu`` is the proximal coefficient for local training."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, mu: float = 0.01, server_lr: float = 1.0) -> None:
        super().__init__(server_lr=server_lr)
        self.mu = require_fraction(self.name, "mu", mu, high=float("inf"))

    def options(self) -> dict[str, OptionValue]:
        return {"mu": self.mu, "server_lr": self.server_lr}
