"""``fedgate demo``'s per-round table: a rich table (:mod:`fedgate.display`), drawn for a
terminal or as plain text, with a line under it saying which way the metric is better."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedcore.task import MetricSpec
from fedgate.display import render_table


@dataclass
class RoundRow:
    round: int
    edges: str = "-"
    samples: int | None = 0  # None: securely aggregated, per-edge counts stay on the edges
    value: float | None = None  # the model's metric on the trainer's evaluation
    loss: float | None = None
    epsilon: float | None = None
    released: str = "-"
    rollout: str = "-"
    serving: float | None = None  # the serving version's metric on the same evaluation
    se: float | None = None  # the paired standard error of value - serving (central gate)


def _contributor(c: dict[str, Any], record: dict[str, Any]) -> str:
    """An edge's number in the table; ``~`` when its update was trained on an older base."""
    stale = int(c.get("base_version", 0)) < int(record.get("base_version", 0))
    return str(c["edge_id"]).removeprefix("edge-") + ("~" if stale else "")


def columns(metric: str) -> tuple[str, ...]:
    """The table's headers; the metric's column is named after the model's metric."""
    return (
        "round",
        "edges",
        "samples",
        metric,
        "vs serving",
        "loss",
        "epsilon",
        "released",
        "rollout",
    )


def table(
    rows: list[RoundRow], metric: str | MetricSpec = "accuracy", *, fancy: bool = False
) -> list[str]:
    """The per-round table: the header, (when plain) a rule, a line per round; then,
    when ``metric`` is a :class:`MetricSpec`, a line saying which way it is better.
    ``fancy``: drawn for a terminal."""
    name = metric.name if isinstance(metric, MetricSpec) else metric
    points = metric.share if isinstance(metric, MetricSpec) else name == "accuracy"
    cells = [
        [
            r.round,
            r.edges,
            r.samples,
            r.value,
            change(r, points),
            r.loss,
            None if r.epsilon is None else f"{r.epsilon:.2f}",
            r.released,
            r.rollout,
        ]
        for r in rows
    ]
    right = {"samples", name, "vs serving", "loss", "epsilon"}
    lines = render_table(columns(name), cells, fancy=fancy, right=right)
    if isinstance(metric, MetricSpec):
        unit = "x100" if points else f"in {name}'s units"
        lines.append(
            f"({name}: {metric.direction} is better; vs serving: candidate minus serving, "
            f"{unit}, ± one paired standard error)"
        )
    return lines


def change(r: RoundRow, points: bool = True) -> str:
    """The candidate against the serving version, in points (x100) for a share such as
    accuracy and in the metric's own units otherwise (an MAE), with the paired standard
    error when the trainer's gate measured one: a change inside one or two of them is
    noise of the evaluation set, not learning or forgetting."""
    if r.value is None or r.serving is None:
        return "-"
    scale = 100.0 if points else 1.0
    diff = f"{scale * (r.value - r.serving):+.{_digits(points, r)}f}"
    if r.se is None:
        return diff
    return f"{diff} ± {scale * r.se:.{_digits(points, r)}f}"


def _digits(points: bool, r: RoundRow) -> int:
    """Decimals: one for points; for a metric in its own units, enough for 3 significant
    digits of the serving value (an MAE of 46.5: one; of 0.0123: four)."""
    if points or not r.serving:
        return 1
    magnitude = math.floor(math.log10(abs(r.serving)))
    return max(0, 2 - magnitude)
