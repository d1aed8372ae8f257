"""The edge runtime's Prometheus metrics: what it captured, labelled and learned.

Inference itself is measured by Triton on its own metrics port (``nv_inference_*``);
these series cover the edge runtime:

- ``fedgate_edge_learn_events_total{model,kind}``: learner events (``train-started``,
  ``train-paused``, ``train-finished``, ``train-abandoned``, ``update-published``,
  ``round-refused``, ...), counted as they are emitted;
- ``fedgate_edge_update_samples_total{model}``: samples behind published updates (sealed,
  or masked into a secure round);
- ``fedgate_edge_local_loss{model}``, ``fedgate_edge_local_metric{model,metric}`` (the
  model's own metric: accuracy, mae, ...) and ``fedgate_edge_local_accuracy{model}``
  (accuracy models): the local evaluation of the last published update (held-out labels
  of this edge);
- ``fedgate_edge_spool_samples{model}``, ``..._labelled``, ``..._new_labels``,
  ``..._tombstones``: the capture spool, read when Prometheus scrapes;
- ``fedgate_edge_loop_failures_total{loop}``: failures of the runtime's loops (logged and
  retried, :mod:`fedcore.loops`);
- ``fedgate_edge_triton_restarts_total{reason}``, ``fedgate_edge_triton_up``: the
  supervision of tritonserver (:mod:`edge_runtime.supervisor`), when the runtime passes
  its collector.

Only counts and aggregates: no input, label or request id leaves the edge this way.
Served on ``metrics_port`` when the settings set one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from edge_runtime.events import KINDS, EventLog, LearnEvent
from edge_runtime.spool import Spool
from fedcore.loops import LoopFailureCollector
from fedcore.metrics_http import MetricsServer, serve_metrics
from fedcore.settings import ServiceSettings

log = logging.getLogger(__name__)

EDGE_LOOPS = ("heartbeat", "learner", "rounds-watch", "rollout-watch", "rollout-apply")
"""The edge's service loops, in ``fedgate_edge_loop_failures_total{loop}``."""


class Collector(Protocol):
    def describe(self) -> Iterator[Metric]: ...
    def collect(self) -> Iterator[Metric]: ...


class SpoolCollector:
    """Row counts of each model's spool, read at scrape time."""

    def __init__(self, spools: Mapping[str, Spool]) -> None:
        self.spools = spools

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        families = {
            "samples": "Captured samples in the spool",
            "labelled": "Captured samples with a feedback label",
            "new_labels": "Labels joined since the last training job took them",
            "tombstones": "Evicted request ids remembered (feedback on them gets 410)",
        }
        gauges = {
            key: GaugeMetricFamily(f"fedgate_edge_spool_{key}", text, labels=["model"])
            for key, text in families.items()
        }
        for model, spool in list(self.spools.items()):
            try:
                stats = spool.stats()
            except sqlite3.Error as exc:  # closed at shutdown, or busy past its timeout
                log.debug("spool stats unavailable: %s", exc, extra={"model": model})
                continue
            for key, family in gauges.items():
                family.add_metric([model], getattr(stats, key))
        yield from gauges.values()


class EdgeMetrics:
    """The edge's registry: learner event counters (a listener on the event log) and the
    spool collector."""

    def __init__(
        self, spools: Mapping[str, Spool], events: EventLog, collectors: Sequence[Collector] = ()
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(LoopFailureCollector("edge", EDGE_LOOPS))
        for collector in collectors:
            r.register(collector)
        self.events = Counter(
            "fedgate_edge_learn_events",
            "Learner events by model and kind",
            ["model", "kind"],
            registry=r,
        )
        self.update_samples = Counter(
            "fedgate_edge_update_samples",
            "Training samples behind the updates this edge published",
            ["model"],
            registry=r,
        )
        self.loss = Gauge(
            "fedgate_edge_local_loss",
            "Local held-out loss of the last published update",
            ["model"],
            registry=r,
        )
        self.accuracy = Gauge(
            "fedgate_edge_local_accuracy",
            "Local held-out accuracy of the last published update",
            ["model"],
            registry=r,
        )
        self.metric = Gauge(
            "fedgate_edge_local_metric",
            "Local held-out value of the model's own metric for the last published update",
            ["model", "metric"],
            registry=r,
        )
        r.register(SpoolCollector(spools))
        for model in spools:
            for kind in KINDS:
                self.events.labels(model, kind)
            self.update_samples.labels(model)
        events.listeners.append(self.on_event)

    def on_event(self, event: LearnEvent) -> None:
        self.events.labels(event.model, event.kind).inc()
        if event.kind not in ("update-published", "update-masked"):
            return
        self.update_samples.labels(event.model).inc(event.num_samples or 0)
        if event.loss is not None:
            self.loss.labels(event.model).set(event.loss)
        if event.accuracy is not None:
            self.accuracy.labels(event.model).set(event.accuracy)
        if event.metric is not None and event.value is not None:
            self.metric.labels(event.model, event.metric).set(event.value)


def start_metrics(
    settings: ServiceSettings,
    spools: Mapping[str, Spool],
    events: EventLog,
    collectors: Sequence[Collector] = (),
) -> MetricsServer | None:
    """Count the learner's events; serve them with the spool gauges and ``collectors``
    (Triton's supervision, the loop failures) on ``metrics_port``.

    None, and nothing counted, when no port is set.
    """
    if settings.metrics_port is None:
        return None
    metrics = EdgeMetrics(spools, events, collectors)
    server = serve_metrics(metrics.registry, settings.metrics_host, settings.metrics_port)
    log.info(
        "metrics at http://%s:%d/metrics",
        settings.metrics_host,
        server.port,
        extra={"port": server.port},
    )
    return server
