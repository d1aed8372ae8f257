"""Metrics of the trainer and the edge runtime, and their HTTP exposition."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from edge_runtime.events import EventLog
from edge_runtime.spool import Spool, spool_path
from edge_runtime.telemetry import EdgeMetrics
from edge_runtime.telemetry import start_metrics as start_edge_metrics
from fedcore.settings import ServiceSettings
from fedcore.triton_model import capture_source
from fedcore.wire import RoundRecord
from trainer.ingest_metrics import IngestMetrics
from trainer.rounds import Contribution, RoundBook, RoundPolicy
from trainer.strategies import get_strategy
from trainer.telemetry import RoundsCollector, start_metrics


def settings(tmp_path: Path, port: int | None) -> ServiceSettings:
    return ServiceSettings(nats_user="x", nats_password_file=tmp_path / "pass", metrics_port=port)


def book() -> RoundBook:
    return RoundBook(
        "digits",
        RoundPolicy(min_updates=2, deadline_s=60),
        get_strategy("fedavg"),
        version=4,
        digest="ab" * 32,
        params=np.zeros(3, np.float32),
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    found: float | None = registry.get_sample_value(name, labels)
    return found


def test_round_gauges_follow_the_book() -> None:
    b = book()
    registry = CollectorRegistry()
    registry.register(RoundsCollector({"digits": b}, clock=lambda: 130.0))
    assert value(registry, "fedgate_trainer_model_version", model="digits") == 4
    assert value(registry, "fedgate_trainer_round_open", model="digits") == 0
    assert value(registry, "fedgate_trainer_round", model="digits") == 0
    assert value(registry, "fedgate_trainer_round_deadline_seconds", model="digits") is None
    b.open(["edge-1", "edge-2"], now=100.0)
    b.fold(Contribution("a" * 32, "edge-1", 25, 4, 0.0), np.ones(3, np.float32))
    assert value(registry, "fedgate_trainer_round_open", model="digits") == 1
    assert value(registry, "fedgate_trainer_round", model="digits") == 1
    assert value(registry, "fedgate_trainer_round_updates", model="digits") == 1
    assert value(registry, "fedgate_trainer_round_samples", model="digits") == 25
    assert value(registry, "fedgate_trainer_round_deadline_seconds", model="digits") == 30.0


def test_round_outcomes_are_counted_by_outcome(tmp_path: Path) -> None:
    telemetry = start_metrics(settings(tmp_path, None), {"digits": book()})
    registry = telemetry.registry
    for outcome in ("released", "held", "failed"):
        assert (
            value(registry, "fedgate_trainer_rounds_closed_total", model="digits", outcome=outcome)
            == 0
        )
    assert value(registry, "fedgate_trainer_candidate_accuracy", model="digits") is None
    common = {
        "model": "digits",
        "mode": "sync",
        "base_version": 4,
        "opened_ts": 1.0,
        "closed_ts": 2.0,
    }
    telemetry.outcomes.observe(
        RoundRecord(
            round=1, outcome="held", reason="gate", accuracy=0.8, serving_accuracy=0.9, **common
        )
    )
    telemetry.outcomes.observe(
        RoundRecord(
            round=2,
            outcome="released",
            reason="ok",
            released_version=5,
            accuracy=0.93,
            serving_accuracy=0.9,
            epsilon=1.5,
            **common,
        )
    )
    telemetry.outcomes.observe(RoundRecord(round=3, outcome="failed", reason="no quorum", **common))
    counts = {
        o: value(registry, "fedgate_trainer_rounds_closed_total", model="digits", outcome=o)
        for o in ("released", "held", "failed")
    }
    assert counts == {"released": 1, "held": 1, "failed": 1}
    assert value(registry, "fedgate_trainer_candidate_accuracy", model="digits") == 0.93
    assert value(registry, "fedgate_trainer_serving_accuracy", model="digits") == 0.9
    assert value(registry, "fedgate_trainer_privacy_epsilon", model="digits") == 1.5


def test_trainer_serves_rounds_and_ingestion_over_http(tmp_path: Path) -> None:
    assert start_metrics(settings(tmp_path, None), {"digits": book()}).server is None
    telemetry = start_metrics(settings(tmp_path, 0), {"digits": book()})
    IngestMetrics(telemetry.registry).rejected.labels(reason="bad-signature").inc()
    server = telemetry.server
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as resp:
            text = resp.read().decode()
    finally:
        server.close()
        server.close()  # idempotent
    assert 'fedgate_trainer_model_version{model="digits"} 4.0' in text
    assert 'fedgate_trainer_updates_rejected_total{reason="bad-signature"} 1.0' in text


def capture(path: Path, n: int) -> None:
    namespace: dict[str, Any] = {"__name__": "capture_under_test"}
    exec(compile(capture_source(), "<capture>", "exec"), namespace)
    writer = namespace["CaptureWriter"](str(path), 1.0, 100, 1000, version=1)
    for i in range(n):
        x = np.full((1, 64), i / 100, dtype=np.float32)
        assert writer.offer(f"req-{i}", [x], [np.zeros((1, 10), np.float32)])
    writer.flush()
    writer.close()


def test_edge_counts_learner_events_and_reads_the_spool(tmp_path: Path) -> None:
    path = spool_path(tmp_path, "digits")
    spool = Spool(path)
    try:
        capture(path, 3)
        spool.join_label("req-1", 7)
        events = EventLog()
        metrics = EdgeMetrics({"digits": spool}, events)
        r = metrics.registry
        assert (
            value(r, "fedgate_edge_learn_events_total", model="digits", kind="train-started") == 0
        )
        events.emit("train-started", "digits", batch=0, round=2)
        events.emit("update-published", "digits", round=2, num_samples=40, loss=0.4, accuracy=0.9)
        events.emit("update-published", "digits", round=3, num_samples=2)
        assert (
            value(r, "fedgate_edge_learn_events_total", model="digits", kind="train-started") == 1
        )
        assert (
            value(r, "fedgate_edge_learn_events_total", model="digits", kind="update-published")
            == 2
        )
        assert value(r, "fedgate_edge_update_samples_total", model="digits") == 42
        assert value(r, "fedgate_edge_local_loss", model="digits") == 0.4
        assert value(r, "fedgate_edge_local_accuracy", model="digits") == 0.9
        assert value(r, "fedgate_edge_spool_samples", model="digits") == 3
        assert value(r, "fedgate_edge_spool_labelled", model="digits") == 1
        assert value(r, "fedgate_edge_spool_new_labels", model="digits") == 1
    finally:
        spool.close()
    # a closed spool (shutdown) drops its gauges instead of failing the scrape
    assert value(r, "fedgate_edge_spool_samples", model="digits") is None
    assert value(r, "fedgate_edge_update_samples_total", model="digits") == 42


def test_edge_metrics_are_off_without_a_port(tmp_path: Path) -> None:
    events = EventLog()
    assert start_edge_metrics(settings(tmp_path, None), {}, events) is None
    assert events.listeners == []
    server = start_edge_metrics(settings(tmp_path, 0), {}, events)
    assert server is not None and len(events.listeners) == 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as resp:
            assert b"fedgate_edge_learn_events_total" in resp.read()
    finally:
        server.close()


def test_docs_list_every_metric_we_export() -> None:
    from tests.test_deploy_monitoring import exported_names, gateway_metrics, service_metrics

    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(fedgate_(?:gateway|trainer|edge)_[a-z_]+)`", doc))
    exported = exported_names()
    assert exported - documented == set(), "exported but not in docs/metrics.md"
    assert documented - (gateway_metrics() | service_metrics()) == set(), "documented, not exported"
    assert "fedgate_edge_spool_tombstones" in exported


def test_edge_and_trainer_gauges_name_the_models_own_metric(tmp_path: Path) -> None:
    from edge_runtime.learner import _metric
    from edge_runtime.worker_reports import Finished

    spool = Spool(spool_path(tmp_path, "diabetes"))
    try:
        events = EventLog()
        r = EdgeMetrics({"diabetes": spool}, events).registry
        result = Finished(
            batch=0,
            samples=9,
            holdout=3,
            upto=9,
            loss=3000.0,
            base_loss=None,
            metric="mae",
            value=46.5,
            base_value=56.0,
        )
        events.emit(
            "update-published",
            "diabetes",
            round=1,
            num_samples=9,
            **_metric(result, result.figures()),
        )
        assert value(r, "fedgate_edge_local_metric", model="diabetes", metric="mae") == 46.5
        assert value(r, "fedgate_edge_local_accuracy", model="diabetes") is None
    finally:
        spool.close()
    from trainer.telemetry import RoundOutcomes

    registry = CollectorRegistry()
    outcomes = RoundOutcomes(registry, ["diabetes"])
    outcomes.observe(
        RoundRecord(
            model="diabetes",
            round=1,
            mode="sync",
            outcome="released",
            reason="ok",
            base_version=1,
            released_version=2,
            opened_ts=0.0,
            closed_ts=1.0,
            metric="mae",
            higher_is_better=False,
            value=46.5,
            serving_value=56.0,
            evaluation="federated",
            eval_samples=60,
        )
    )
    assert (
        value(registry, "fedgate_trainer_candidate_metric", model="diabetes", metric="mae") == 46.5
    )
    assert value(registry, "fedgate_trainer_serving_metric", model="diabetes", metric="mae") == 56.0
    assert value(registry, "fedgate_trainer_candidate_accuracy", model="diabetes") is None
