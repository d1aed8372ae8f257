"""What the fine-tuning worker tells the learner: typed reports, one JSON object a line.

The worker (:mod:`edge_runtime.finetune`) writes each report with :func:`encode_report`;
the learner's handle on it (:mod:`edge_runtime.worker`) reads each line with
:func:`decode_report`, strictly: no key repeated (:mod:`fedcore.strict_json`), no unknown
field, every field of its type. ``exited`` is the handle's own report (the worker's exit
code), never written by the worker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from fedcore.strict_json import loads_strict


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Started(_Report):
    """Set up, about to run its first mini-batch."""

    event: Literal["started"] = "started"
    samples: int = Field(ge=0)
    """labelled samples it trains on"""
    holdout: int = Field(ge=0)
    """labelled samples it evaluates on"""
    upto: int
    """the newest spool row it read"""
    device: str


class Paused(_Report):
    event: Literal["paused"] = "paused"
    batch: int = Field(ge=0)
    """mini-batches done"""


class Resumed(_Report):
    event: Literal["resumed"] = "resumed"
    batch: int = Field(ge=0)


class Stopped(_Report):
    """Told to stop, or nothing to train on (``reason``); the job has ended."""

    event: Literal["stopped"] = "stopped"
    batch: int = Field(ge=0)
    reason: str | None = None


class Finished(_Report):
    """Trained; the new flat weights are in the job's ``output``. Loss and the model's
    own metric (``metric``: ``accuracy``, ``mae``, ...) on the local held-out split, after
    (``loss``, ``value``) and before (``base_loss``, ``base_value``); None without
    held-out samples (or when not finite)."""

    event: Literal["finished"] = "finished"
    batch: int = Field(ge=0)
    samples: int = Field(ge=0)
    holdout: int = Field(ge=0)
    upto: int
    loss: float | None
    base_loss: float | None
    metric: str
    value: float | None
    base_value: float | None

    def figures(self) -> dict[str, float | None]:
        """Loss and the metric under their names: ``loss``, ``base_loss``, ``<metric>``,
        ``base_<metric>`` (a metric name that is no identifier is left out)."""
        out = {"loss": self.loss, "base_loss": self.base_loss}
        if self.metric.isidentifier():
            out[self.metric] = self.value
            out[f"base_{self.metric}"] = self.base_value
        return out


class Failed(_Report):
    """The worker raised; it exits with status 1."""

    event: Literal["failed"] = "failed"
    reason: str


class Exited(_Report):
    """The worker process ended (the handle's report, after the worker's last)."""

    event: Literal["exited"] = "exited"
    code: int | None


WorkerReport = Annotated[
    Started | Paused | Resumed | Stopped | Finished | Failed | Exited,
    Field(discriminator="event"),
]
_REPORT: TypeAdapter[WorkerReport] = TypeAdapter(WorkerReport)


def encode_report(report: WorkerReport) -> str:
    """One report as a line of JSON (no newline)."""
    return report.model_dump_json()


def decode_report(line: bytes | str) -> WorkerReport:
    """One line of the worker's, strictly; ``ValueError`` (a pydantic ``ValidationError``,
    a repeated key, bad UTF-8 or JSON) when it is no report."""
    text = line.decode() if isinstance(line, bytes) else line
    return _REPORT.validate_python(loads_strict(text))
