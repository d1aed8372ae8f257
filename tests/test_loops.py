"""``fedcore.loops``: backoff delays and the loop-failure counts each service exports."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from fedcore.loops import Backoff, LoopFailureCollector, LoopFailures, loop_failed


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_backoff_jitter_stays_within_its_band_and_under_the_cap() -> None:
    low, high = Backoff(1.0, 8.0, jitter=0.2, rand=lambda: 0.0), Backoff(1.0, 8.0, rand=lambda: 1.0)
    assert low.next() == pytest.approx(0.8) and high.next() == pytest.approx(1.2)
    for _ in range(10):
        low.next(), high.next()
    assert low.next() == pytest.approx(6.4) and high.next() == 8.0


def test_backoff_does_not_overflow_however_long_it_fails() -> None:
    b = Backoff(0.1, 30.0, jitter=0.0)
    delays = [b.next() for _ in range(5000)]
    assert delays[-1] == 30.0 and b.attempts == 5000


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_backoff_refuses_nonsense(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="bad backoff"):
        Backoff(base, cap)


def test_failures_are_counted_per_service_and_exported_with_zeros() -> None:
    failures = LoopFailures()
    registry = CollectorRegistry()
    registry.register(LoopFailureCollector("edge", ["heartbeat", "learner"], failures))
    failures.record("gateway", "probe")  # another service in the same process
    assert registry.get_sample_value("fedgate_edge_loop_failures_total", {"loop": "heartbeat"}) == 0
    failures.record("edge", "heartbeat")
    failures.record("edge", "heartbeat")
    failures.record("edge", "other")
    value = registry.get_sample_value
    assert value("fedgate_edge_loop_failures_total", {"loop": "heartbeat"}) == 2
    assert value("fedgate_edge_loop_failures_total", {"loop": "learner"}) == 0
    assert value("fedgate_edge_loop_failures_total", {"loop": "other"}) == 1
    assert value("fedgate_edge_loop_failures_total", {"loop": "probe"}) is None


def test_loop_failed_logs_with_the_loop_and_a_traceback_only_when_unexpected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("tests.loops")
    with caplog.at_level(logging.WARNING, "tests.loops"):
        loop_failed(logger, "test", "watch", ConnectionError("nats down"), 1.5)
        try:
            raise KeyError("bug")
        except KeyError as exc:
            loop_failed(logger, "test", "watch", exc, expected=False)
    first, second = caplog.records
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert (
        first.getMessage() == "watch loop failed: ConnectionError('nats down'); retrying in 1.50s"
    )
    assert first.__dict__["loop"] == "watch"
    assert second.levelno == logging.ERROR and second.exc_info is not None
