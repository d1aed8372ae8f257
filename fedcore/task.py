"""What a model learns and how it is judged: the task part of a model spec.

A :class:`Task` names the training loss, the kind of label feedback carries, which of the
model's inputs and outputs the edge spools, which output the loss and the metric read,
and the metric the gates use with its direction. Everything that used to assume "a
single-input classifier" asks the task instead: label validation (gateway and edge),
the spool's label encoding, the fine-tuning loss, the evaluation metric, the per-version
label tally. The numpy parts here need no torch; :func:`torch_loss` imports it lazily.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedcore.errors import ModelSpecError

if TYPE_CHECKING:
    import torch

Label = int | float | list[float]
"""A label as feedback carries it (JSON): a class index, a number, or a vector."""


class LabelKind(StrEnum):
    """The label feedback carries for a model."""

    CLASS = "class"  # an integer class index below the output's width
    FLOAT = "float"  # one number (a one-value output)
    VECTOR = "vector"  # as many numbers as the output has values
    MULTI_HOT = "multi_hot"  # as many 0/1 values as the output has values


class Loss(StrEnum):
    """Training losses a task can name (per sample, then weighted by the sample weights)."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    L1 = "l1"
    BCE_WITH_LOGITS = "bce_with_logits"


@dataclass(frozen=True)
class MetricSpec:
    """A metric the gates compare: its name, how it is computed, and its direction."""

    name: str
    higher_is_better: bool
    share: bool = False
    """A share in [0, 1] (accuracy): changes are shown in points, x100."""

    @property
    def direction(self) -> str:
        return "higher" if self.higher_is_better else "lower"

    def worse_by(self, serving: float, candidate: float) -> float:
        """How much worse ``candidate`` is than ``serving`` (negative: it is better)."""
        return serving - candidate if self.higher_is_better else candidate - serving


METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec("accuracy", higher_is_better=True, share=True),
    "mae": MetricSpec("mae", higher_is_better=False),
    "mse": MetricSpec("mse", higher_is_better=False),
    "hamming_accuracy": MetricSpec("hamming_accuracy", higher_is_better=True, share=True),
}
"""The metrics fedgate computes, by name: ``accuracy`` (argmax equals the class label),
``mae`` and ``mse`` (per-sample mean absolute / squared error), ``hamming_accuracy`` (share
of multi-hot positions predicted right, a logit above 0 meaning 1)."""

_LABEL_METRICS: dict[LabelKind, frozenset[str]] = {
    LabelKind.CLASS: frozenset({"accuracy"}),
    LabelKind.FLOAT: frozenset({"mae", "mse"}),
    LabelKind.VECTOR: frozenset({"mae", "mse"}),
    LabelKind.MULTI_HOT: frozenset({"hamming_accuracy"}),
}
_LABEL_LOSSES: dict[LabelKind, frozenset[Loss]] = {
    LabelKind.CLASS: frozenset({Loss.CROSS_ENTROPY}),
    LabelKind.FLOAT: frozenset({Loss.MSE, Loss.L1}),
    LabelKind.VECTOR: frozenset({Loss.MSE, Loss.L1}),
    LabelKind.MULTI_HOT: frozenset({Loss.BCE_WITH_LOGITS}),
}


@dataclass(frozen=True)
class Task:
    """The task of a model. The defaults are a classifier on the first output.

    ``output``: the output the loss and the metric read (None: the first). ``capture_inputs``
    / ``capture_outputs``: the tensors the edge spools (None: all of them); fine-tuning
    needs every input captured.
    """

    loss: Loss = Loss.CROSS_ENTROPY
    label: LabelKind = LabelKind.CLASS
    metric: str = "accuracy"
    output: str | None = None
    capture_inputs: tuple[str, ...] | None = None
    capture_outputs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ModelSpecError(
                f"task.metric: unknown metric {self.metric!r}; known: {sorted(METRICS)}"
            )
        if self.metric not in _LABEL_METRICS[self.label]:
            raise ModelSpecError(
                f"task.metric: {self.metric!r} does not apply to {self.label.value} labels; "
                f"use one of {sorted(_LABEL_METRICS[self.label])}"
            )
        if self.loss not in _LABEL_LOSSES[self.label]:
            raise ModelSpecError(
                f"task.loss: {self.loss.value!r} does not apply to {self.label.value} labels; "
                f"use one of {sorted(x.value for x in _LABEL_LOSSES[self.label])}"
            )

    @property
    def metric_spec(self) -> MetricSpec:
        return METRICS[self.metric]


# -- labels ------------------------------------------------------------------------------


def check_label(task: Task, width: int, value: Any) -> Label:
    """``value`` (parsed JSON) as a label of ``task`` for an output of ``width`` values.

    Raises ``ValueError`` with a message fit for a 422 on field ``label``.
    """
    kind = task.label
    if kind is LabelKind.CLASS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer class index")
        if not 0 <= value < width:
            raise ValueError(f"{value} is not a class of this model (0..{width - 1})")
        return value
    if kind is LabelKind.FLOAT:
        if width != 1:
            raise ValueError(f"float labels need a one-value output, this one has {width}")
        number = _finite(value)
        return number
    if not isinstance(value, list):
        raise ValueError(f"must be a list of {width} numbers")
    if len(value) != width:
        raise ValueError(f"must have {width} values, got {len(value)}")
    numbers = [_finite(v) for v in value]
    if kind is LabelKind.MULTI_HOT and any(v not in (0.0, 1.0) for v in numbers):
        raise ValueError("multi-hot values must each be 0 or 1")
    return numbers


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be finite")
    return number


def encode_label(label: Label) -> int | str:
    """The spool's form of a label: a class index as an integer, anything else as JSON text
    (so SQLite's integer affinity never rounds it)."""
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    return json.dumps(label if isinstance(label, list) else [float(label)])


def decode_labels(task: Task, stored: Sequence[Any], width: int) -> NDArray[Any]:
    """Spooled labels as the training target: INT64 [n] for classes, FP32 [n, width] else."""
    if task.label is LabelKind.CLASS:
        return np.asarray([int(v) for v in stored], dtype=np.int64)
    rows = [json.loads(v) if isinstance(v, str) else [float(v)] for v in stored]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), width)


# -- metric ------------------------------------------------------------------------------


def sample_scores(task: Task, outputs: NDArray[Any], target: NDArray[Any]) -> NDArray[Any]:
    """The metric per sample (FP64 [n]); the metric of a set is their (weighted) mean."""
    n = len(target)
    out = np.asarray(outputs, dtype=np.float64).reshape(n, -1)
    scores: NDArray[Any]
    if task.metric == "accuracy":
        scores = (out.argmax(axis=1) == np.asarray(target).reshape(n)).astype(np.float64)
        return scores
    y = np.asarray(target, dtype=np.float64).reshape(n, -1)
    if task.metric == "mae":
        scores = np.abs(out - y).mean(axis=1)
    elif task.metric == "mse":
        scores = ((out - y) ** 2).mean(axis=1)
    else:
        scores = ((out > 0.0) == (y > 0.5)).mean(axis=1)
    return scores


def metric_value(task: Task, outputs: NDArray[Any], target: NDArray[Any]) -> float | None:
    """The task's metric over a set (None for an empty set)."""
    if len(target) == 0:
        return None
    return float(sample_scores(task, outputs, target).mean())


# -- loss --------------------------------------------------------------------------------


def torch_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The task's loss per sample (shape [n]), for weighting by the sample weights."""
    import torch.nn.functional as F

    if task.loss is Loss.CROSS_ENTROPY:
        return F.cross_entropy(output, target, reduction="none")
    pred = output.reshape(len(output), -1)
    y = target.reshape(len(target), -1).to(pred.dtype)
    if task.loss is Loss.MSE:
        return F.mse_loss(pred, y, reduction="none").mean(dim=1)
    if task.loss is Loss.L1:
        return F.l1_loss(pred, y, reduction="none").mean(dim=1)
    return F.binary_cross_entropy_with_logits(pred, y, reduction="none").mean(dim=1)
