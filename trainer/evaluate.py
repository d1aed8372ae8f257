"""Evaluation of a candidate version, and the gate that decides whether it is released.

The candidate is scored on the trainer's held-out set (public data the trainer owns,
never edge data) and compared with the serving version; the metrics the edges report
on their local held-out splits are a second opinion. A candidate worse than the serving
version by more than the margin on either is held back, with the reason recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedcore.params import load_flat
from fedcore.spec import ModelSpec


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    loss: float
    samples: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    release: bool
    reason: str


def evaluate(spec: ModelSpec, params: NDArray[Any], x: NDArray[Any], y: NDArray[Any]) -> Metrics:
    """Accuracy and mean cross-entropy of ``params`` on (x, y)."""
    import torch

    module = spec.build_module()
    load_flat(module, params)
    with torch.no_grad():
        logits = module.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        target = torch.from_numpy(np.asarray(y, dtype=np.int64))
        loss = float(torch.nn.functional.cross_entropy(logits, target).item())
        accuracy = int((logits.argmax(1) == target).sum().item()) / max(1, len(y))
    return Metrics(accuracy=accuracy, loss=loss, samples=len(y))


def weighted_edge_accuracy(reports: dict[str, tuple[float, int]]) -> float | None:
    """Sample-weighted mean of the accuracies edges reported, or None without reports."""
    total = sum(n for _, n in reports.values())
    if total <= 0:
        return None
    return sum(acc * n for acc, n in reports.values()) / total


def gate(
    candidate: Metrics,
    serving: Metrics,
    *,
    margin: float,
    edge_accuracy: float | None = None,
    serving_edge_accuracy: float | None = None,
) -> GateDecision:
    """Release unless the candidate is worse than serving by more than ``margin``."""
    drop = serving.accuracy - candidate.accuracy
    if drop > margin:
        return GateDecision(
            False,
            f"held-out accuracy {candidate.accuracy:.4f} is {drop:.4f} below serving "
            f"{serving.accuracy:.4f} (margin {margin})",
        )
    if edge_accuracy is not None and serving_edge_accuracy is not None:
        edge_drop = serving_edge_accuracy - edge_accuracy
        if edge_drop > margin:
            return GateDecision(
                False,
                f"edge-reported accuracy {edge_accuracy:.4f} is {edge_drop:.4f} below "
                f"serving {serving_edge_accuracy:.4f} (margin {margin})",
            )
    return GateDecision(
        True,
        f"held-out accuracy {candidate.accuracy:.4f} vs serving {serving.accuracy:.4f}",
    )
