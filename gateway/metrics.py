"""Prometheus metrics of the gateway, in a registry of its own (one per app).

The per-request series (requests, latency, in-flight) are plain counters in dicts that a
custom collector turns into Prometheus families at scrape time: the hot path pays a dict
update and a bisect, not prometheus_client's locks. Rare events (retries, ejections,
denials) use ordinary prometheus_client counters.

Label values come only from the fleet (models and versions that edges report, edge ids)
or fixed sets, never from request paths as sent, so a client cannot blow up cardinality.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fedcore.heartbeats import REFUSALS as HEARTBEAT_REFUSALS

if TYPE_CHECKING:
    from gateway.fleet import Fleet

UNKNOWN = "<unknown>"  # the model label of requests for models no edge reports
DEPARTED = "<departed>"  # the edge label of requests served by edges that have left
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Latency:
    """One histogram series: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


class RequestStats:
    """Per-request series, updated on the hot path, collected at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.latency: dict[tuple[str, str], _Latency] = {}
        self.inflight: dict[str, int] = {}
        self._absent: dict[tuple[str, str], float] = {}  # (model, version) -> since

    def fold_edge(self, edge: str) -> None:
        """Move the counts of an edge that left under :data:`DEPARTED`: its series end, and
        per-version sums (the rollout gates' deltas) stay as they were."""
        for key in [k for k in self.requests if k[2] == edge]:
            model, version, _, status = key
            folded = (model, version, DEPARTED, status)
            self.requests[folded] = self.requests.get(folded, 0) + self.requests.pop(key)

    def retire(self, live: set[tuple[str, str]], now: float, grace_s: float) -> None:
        """Drop the series of versions absent from ``live`` for ``grace_s`` seconds."""
        seen = {k[:2] for k in self.requests} | set(self.latency)
        for key in seen:
            if key in live or not key[1]:  # version "": refused before routing; kept
                self._absent.pop(key, None)
            elif now - self._absent.setdefault(key, now) >= grace_s:
                del self._absent[key]
                self.latency.pop(key, None)
                for gone in [k for k in self.requests if k[:2] == key]:
                    del self.requests[gone]

    def observe(self, model: str, version: str, edge: str, status: int, seconds: float) -> None:
        key = (model, version, edge, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        series = self.latency.get((model, version))
        if series is None:
            series = self.latency[(model, version)] = _Latency()
        series.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series.total += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fedgate_gateway_requests",
            "Inference requests answered, by model, version, serving edge and HTTP status",
            labels=["model", "version", "edge", "status"],
        )
        for (model, version, edge, status), count in list(self.requests.items()):
            requests.add_metric([model, version, edge, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "fedgate_gateway_request_duration_seconds",
            "Inference request latency through the gateway (request received to response sent)",
            labels=["model", "version"],
        )
        for (model, version), series in list(self.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), series.counts, strict=True):
                cumulative += count
                buckets.append((_bound(bound), float(cumulative)))
            latency.add_metric([model, version], buckets, series.total)
        yield latency
        inflight = GaugeMetricFamily(
            "fedgate_gateway_inflight_requests",
            "Inference requests in flight in the gateway",
            labels=["model"],
        )
        for model, count in list(self.inflight.items()):
            inflight.add_metric([model], count)
        yield inflight


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class GatewayMetrics:
    """Requests, latency, in-flight, retries, ejections and denials."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stats = RequestStats()
        r.register(self.stats)
        self.retries = Counter(
            "fedgate_gateway_retries",
            "Inference requests retried on another edge, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.ejections = Counter(
            "fedgate_gateway_edge_ejections",
            "Edges ejected from routing after failing repeatedly",
            ["edge"],
            registry=r,
        )
        self.readmissions = Counter(
            "fedgate_gateway_edge_readmissions",
            "Ejected edges re-admitted after a successful probe",
            ["edge"],
            registry=r,
        )
        self.denied = Counter(
            "fedgate_gateway_denied",
            "Requests refused before routing: unauthorized, forbidden, rate-limited",
            ["reason"],
            registry=r,
        )
        self.heartbeats_refused = Counter(
            "fedgate_gateway_heartbeats_refused",
            "Heartbeats dropped: malformed, naming another edge than their subject, or from "
            "an edge the registry does not list as active",
            ["reason"],
            registry=r,
        )
        for reason in HEARTBEAT_REFUSALS:
            self.heartbeats_refused.labels(reason)
        self.edges = Gauge(
            "fedgate_gateway_edges", "Fresh edges by routing state", ["state"], registry=r
        )

    def forget_edge(self, edge: str) -> None:
        """An edge left the fleet: fold its request series, drop its own."""
        self.stats.fold_edge(edge)
        for counter in (self.ejections, self.readmissions):
            with contextlib.suppress(KeyError):
                counter.remove(edge)

    def observe(self, model: str, version: str, edge: str, status: int, seconds: float) -> None:
        """Count one answered inference request and its latency."""
        self.stats.observe(model, version, edge, status, seconds)

    def render(self, fleet: Fleet) -> bytes:
        """The exposition text, with the fleet gauge brought up to date."""
        edges = fleet.fresh()
        ejected = sum(1 for e in edges if e.ejected)
        self.edges.labels("admitted").set(len(edges) - ejected)
        self.edges.labels("ejected").set(ejected)
        return bytes(generate_latest(self.registry))
