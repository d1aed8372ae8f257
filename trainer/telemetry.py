"""The trainer's Prometheus registry: update ingestion and the state of each model's rounds.

- the ingestion counters of :mod:`trainer.ingest_metrics` (registered by the caller);
- ``fedgate_trainer_model_version{model}``: the round base (the newest release, or the
  version the fleet went back to after a rollback);
- ``fedgate_trainer_round{model}``: the id of the open round, else of the last one opened;
- ``fedgate_trainer_round_open{model}``: 1 while a round is open;
- ``fedgate_trainer_round_updates{model}``: updates accepted into the open round;
- ``fedgate_trainer_round_samples{model}``: training samples behind those updates;
- ``fedgate_trainer_round_deadline_seconds{model}``: seconds left before the open round's
  deadline (negative once it passed);
- ``fedgate_trainer_rounds_closed_total{model,outcome}``: rounds closed, by outcome
  (``released``, ``held``, ``failed``; every pair exported from the start, at 0);
- ``fedgate_trainer_candidate_metric{model,metric}`` and ``..._serving_metric{model,metric}``:
  the gate metric (the model's own: accuracy, mae, ...) of the last evaluated candidate and
  of the version it was gated against; ``fedgate_trainer_candidate_accuracy{model}`` and
  ``..._serving_accuracy{model}`` the same for models whose metric is accuracy;
  ``fedgate_trainer_privacy_epsilon{model}``: epsilon spent (central DP only).

The round series are read from the round books when Prometheus scrapes (no bookkeeping on
the rounds' path). Served on ``metrics_port`` when the settings set one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from fedcore.metrics_http import MetricsServer, serve_metrics
from fedcore.settings import ServiceSettings
from fedcore.wire import RoundRecord
from trainer.rounds import RoundBook

log = logging.getLogger(__name__)


class RoundsCollector:
    """Gauges of each model's round book, collected at scrape time."""

    def __init__(
        self, books: Mapping[str, RoundBook], clock: Callable[[], float] = time.time
    ) -> None:
        self.books = books
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily; no fixed description needed

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"fedgate_trainer_{name}", text, labels=["model"])

        version = gauge(
            "model_version",
            "The round base: the newest release, or the version the fleet went back to",
        )
        current = gauge("round", "Id of the open round, else of the last round opened")
        is_open = gauge("round_open", "1 while a round of the model is open")
        updates = gauge("round_updates", "Updates accepted into the open round")
        samples = gauge("round_samples", "Training samples behind the open round's updates")
        deadline = gauge("round_deadline_seconds", "Seconds left before the open round's deadline")
        now = self.clock()
        for model, book in list(self.books.items()):
            rnd = book.current
            version.add_metric([model], book.version)
            current.add_metric([model], book.next_round - 1)
            is_open.add_metric([model], 1 if rnd is not None else 0)
            folded = rnd.contributions() if rnd is not None else []
            updates.add_metric([model], len(folded))
            samples.add_metric([model], sum(c.samples for c in folded))
            if rnd is not None:
                deadline.add_metric([model], rnd.announcement.deadline_ts - now)
        yield from (version, current, is_open, updates, samples, deadline)


OUTCOMES = ("released", "held", "failed")


class RoundOutcomes:
    """How rounds ended, counted as they close (``observe`` each :class:`RoundRecord`)."""

    def __init__(self, registry: CollectorRegistry, models: list[str]) -> None:
        self.closed = Counter(
            "fedgate_trainer_rounds_closed",
            "Rounds closed, by outcome (released, held by the gate, failed)",
            ["model", "outcome"],
            registry=registry,
        )
        self.candidate = Gauge(
            "fedgate_trainer_candidate_accuracy",
            "Held-out accuracy of the last evaluated candidate version",
            ["model"],
            registry=registry,
        )
        self.serving = Gauge(
            "fedgate_trainer_serving_accuracy",
            "Held-out accuracy of the version the last candidate was gated against",
            ["model"],
            registry=registry,
        )
        self.metric = Gauge(
            "fedgate_trainer_candidate_metric",
            "The gate metric (accuracy, mae, ...) of the last evaluated candidate version",
            ["model", "metric"],
            registry=registry,
        )
        self.serving_metric = Gauge(
            "fedgate_trainer_serving_metric",
            "The gate metric of the version the last candidate was gated against",
            ["model", "metric"],
            registry=registry,
        )
        self.epsilon = Gauge(
            "fedgate_trainer_privacy_epsilon",
            "Epsilon spent so far (central DP only)",
            ["model"],
            registry=registry,
        )
        for model in models:
            for outcome in OUTCOMES:
                self.closed.labels(model, outcome)

    def observe(self, record: RoundRecord) -> None:
        self.closed.labels(record.model, record.outcome).inc()
        if record.accuracy is not None:
            self.candidate.labels(record.model).set(record.accuracy)
        if record.serving_accuracy is not None:
            self.serving.labels(record.model).set(record.serving_accuracy)
        if record.metric is not None and record.value is not None:
            self.metric.labels(record.model, record.metric).set(record.value)
        if record.metric is not None and record.serving_value is not None:
            self.serving_metric.labels(record.model, record.metric).set(record.serving_value)
        if record.epsilon is not None:
            self.epsilon.labels(record.model).set(record.epsilon)


@dataclass
class Telemetry:
    """The trainer's registry, its round outcomes, and its exposition server when one runs."""

    registry: CollectorRegistry
    outcomes: RoundOutcomes
    server: MetricsServer | None = None


def start_metrics(settings: ServiceSettings, books: Mapping[str, RoundBook]) -> Telemetry:
    """The trainer's registry with the round gauges; served when ``metrics_port`` is set.

    The exposition thread is a daemon: it ends with the process (``server.close()`` stops
    it before).
    """
    registry = CollectorRegistry()
    registry.register(RoundsCollector(books))
    outcomes = RoundOutcomes(registry, list(books))
    if settings.metrics_port is None:
        return Telemetry(registry, outcomes)
    server = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
    log.info(
        "metrics at http://%s:%d/metrics",
        settings.metrics_host,
        server.port,
        extra={"port": server.port},
    )
    return Telemetry(registry, outcomes, server)
