"""Idle detection from Triton's metrics, and the training budget: sans-IO, hand-made readings."""

from __future__ import annotations

import pytest

from edge_runtime.budget import TrainingBudget
from edge_runtime.idle import IdleDetector, IdleThresholds
from edge_runtime.metrics_poll import TritonLoad, parse_load

METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="digits",version="1"} 120
nv_inference_request_success{model="digits",version="2"} 30
nv_inference_request_success{model="other",version="1"} 999
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="digits",version="1"} 5
nv_inference_queue_duration_us{model="digits",version="1"} 4000
nv_inference_queue_duration_us{model="digits",version="2"} 1000
nv_inference_pending_request_count{model="digits",version="1"} 2
nv_inference_pending_request_count{model="other",version="1"} 7
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""


def test_parse_load_sums_one_models_versions() -> None:
    load = parse_load(METRICS, "digits", ts=5.0)
    assert load == TritonLoad(ts=5.0, pending=2, requests=155, queue_us=5000.0)
    assert parse_load(METRICS, "absent", ts=1.0) == TritonLoad(1.0, 0, 0, 0.0)
    assert (
        parse_load("garbage {{{\nnv_inference_pending_request_count 3", "digits", 0.0).pending == 0
    )


def test_rates_between_readings() -> None:
    a, b = TritonLoad(0.0, 0, 100, 1000.0), TritonLoad(2.0, 0, 110, 3000.0)
    assert b.rate_since(a) == 5.0
    assert b.queue_us_since(a) == 200.0
    assert a.rate_since(b) == 0.0  # counters never count backwards


def feed(detector: IdleDetector, readings: list[tuple[float, int, int, float]]) -> list[str]:
    return [detector.observe(TritonLoad(*r)).reason for r in readings]


T = IdleThresholds(
    max_pending=0, max_request_rate=2.0, max_queue_us=1000.0, quiet_s=1.0, window_s=2.0
)


def test_quiet_opens_a_window_only_after_quiet_s() -> None:
    detector = IdleDetector(T)
    reasons = feed(detector, [(t / 4, 0, 10, 0.0) for t in range(7)])
    assert reasons == ["no-data", "settling", "settling", "settling", "settling", "idle", "idle"]


def test_a_trickle_below_the_rate_is_still_idle() -> None:
    detector = IdleDetector(T)
    # one request a second for 6 s: 1 rps < 2 rps
    readings = [(t / 4, 0, int(t / 4), 0.0) for t in range(25)]
    assert feed(detector, readings)[-1] == "idle"


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        ((2.25, 1, 10, 0.0), "pending"),
        ((2.25, 0, 15, 0.0), "burst"),  # 5 requests in 0.25 s > 2 rps * 2 s
        ((2.25, 0, 11, 50000.0), "queue"),
    ],
)
def test_traffic_closes_the_window_at_once(
    reading: tuple[float, int, int, float], reason: str
) -> None:
    detector = IdleDetector(T)
    feed(detector, [(t / 4, 0, 10, 0.0) for t in range(9)])
    assert detector.observe(TritonLoad(*reading)).reason == reason
    # and it takes quiet_s again to reopen
    assert feed(detector, [(2.5, 0, 15, 50000.0), (3.0, 0, 15, 50000.0)])[-1] != "idle"


def test_sustained_rate_over_the_window_is_busy() -> None:
    detector = IdleDetector(T)
    # 3 requests every 0.5 s: 6 rps, never a burst within one interval
    reasons = feed(detector, [(t / 2, 0, 3 * t, 0.0) for t in range(8)])
    assert reasons[-1] == "rate"


def test_counter_reset_restarts_the_history() -> None:
    detector = IdleDetector(T)
    feed(detector, [(t / 4, 0, 100, 0.0) for t in range(9)])
    assert detector.observe(TritonLoad(2.5, 0, 0, 0.0)).reason == "no-data"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_budget_per_window_and_per_day() -> None:
    clock = Clock(1_700_000_000.0)
    budget = TrainingBudget(window_s=10.0, daily_s=25.0, clock=clock)
    budget.open_window()
    budget.charge(8.0)
    assert budget.allows() and budget.remaining_s() == 2.0
    budget.charge(2.5)
    assert budget.exhausted() == "window" and not budget.allows()
    budget.open_window()
    budget.charge(10.0)
    budget.open_window()
    assert budget.remaining_s() == pytest.approx(4.5)
    budget.charge(5.0)
    assert budget.exhausted() == "day"
    saved = budget.state()
    clock.now += 86400  # the next UTC day
    assert budget.allows() and budget.used_today_s == 0.0
    restarted = TrainingBudget(10.0, 25.0, clock=Clock(1_700_000_000.0))
    restarted.restore(saved)
    assert restarted.exhausted() == "day"  # a restart does not hand out a fresh day
    other_day = TrainingBudget(10.0, 25.0, clock=clock)
    other_day.restore(saved)
    assert other_day.allows()
    other_day.restore("garbage")
    assert other_day.allows()
