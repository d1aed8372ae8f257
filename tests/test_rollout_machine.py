"""The rollout state machine and its gates, with hand-made counters (no I/O)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedcore.task import METRICS
from fedcore.wire import DesiredVersions, LabelTally, ModelState
from gateway.gate_counts import Counts, version_counts
from gateway.metrics import LATENCY_BUCKETS, RequestStats
from gateway.rollout_control import _commanded, label_totals, model_metric, quantile
from gateway.rollout_machine import (
    Gates,
    Observation,
    Rollout,
    RolloutSpec,
    VersionStats,
    canary_step,
    desired_of,
    evaluate,
    new_rollout,
    settle,
    split_of,
    staged,
    staging_step,
)
from gateway.rollout_store import Conflict
from gateway.routing import TrafficSplit

T0 = 1000.0


def rollout(**spec: object) -> Rollout:
    return new_rollout("digits", 1, RolloutSpec(version=2, **spec), "ops", T0)  # type: ignore[arg-type]


def canary(r: Rollout) -> Rollout:
    edges = {"edge-1": ModelState(ready=[1, 2], rollout=r.id)}
    out = staging_step(staged(r, T0), edges, T0 + 1)
    assert out is not None and out.state == "canary"
    return out


def obs(
    cand: VersionStats, stable: VersionStats | None = None, elapsed: float = 100.0
) -> Observation:
    return Observation(cand, stable or VersionStats(1000, 0, 0.004), elapsed)


# -- spec --------------------------------------------------------------------------------
def test_spec_defaults_and_stages() -> None:
    assert RolloutSpec(version=2).weights() == (0.1,)
    assert RolloutSpec(version=2, canary=25).weights() == (0.25,)
    assert RolloutSpec(version=2, stages=(10, 50, 100)).weights() == (0.1, 0.5, 1.0)
    for bad in ((50, 10), (0, 10), (10, 10), (), (10, 101)):
        with pytest.raises(ValidationError):
            RolloutSpec(version=2, stages=bad)
    with pytest.raises(ValidationError):
        RolloutSpec.model_validate({"version": 2, "canry": 10})


def test_candidate_must_differ_from_stable() -> None:
    with pytest.raises(ValidationError):
        new_rollout("digits", 2, RolloutSpec(version=2), "ops", T0)


# -- gates ---------------------------------------------------------------------------------
def test_error_rate_gate_fails_once_enough_requests() -> None:
    spec = RolloutSpec(version=2, min_requests=50, window_s=10)
    assert evaluate(spec, obs(VersionStats(49, 10), elapsed=1)).outcome == "wait"
    verdict = evaluate(spec, obs(VersionStats(100, 2), elapsed=1))
    assert verdict.outcome == "fail"
    assert verdict.message == "error rate 0.020 > 0.01 (2 of 100 requests)"
    assert evaluate(spec, obs(VersionStats(100, 1), elapsed=1)).outcome == "wait"  # 0.01 is ok
    assert evaluate(spec, obs(VersionStats(100, 1), elapsed=10)).outcome == "pass"


def test_latency_gate_ratio_floor_and_stable_sample() -> None:
    spec = RolloutSpec(version=2, min_requests=50)
    slow = VersionStats(100, 0, 0.030)
    verdict = evaluate(spec, obs(slow, VersionStats(1000, 0, 0.012)))
    assert verdict.outcome == "fail"
    assert verdict.message == "p99 latency 30.0 ms > 2 x stable 12.0 ms"
    # under the floor (10 ms) a ratio says nothing
    assert (
        evaluate(spec, obs(VersionStats(100, 0, 0.009), VersionStats(1000, 0, 0.001))).outcome
        == "pass"
    )
    # too few stable requests to compare with
    assert evaluate(spec, obs(slow, VersionStats(10, 0, 0.001))).outcome == "pass"
    off = RolloutSpec(version=2, gates=Gates(max_p99_ratio=None))
    assert evaluate(off, obs(slow, VersionStats(1000, 0, 0.001))).outcome == "pass"


def test_accuracy_gate_skipped_without_labels() -> None:
    spec = RolloutSpec(version=2, gates=Gates(min_accuracy=0.8, min_labels=20))
    few = evaluate(spec, obs(VersionStats(100, 0, 0.004, labelled=5, correct=0)))
    assert few.outcome == "pass"
    assert "label gates skipped (5 of 20 labels)" in few.message
    bad = evaluate(spec, obs(VersionStats(100, 0, 0.004, labelled=40, correct=8), elapsed=1))
    assert bad.outcome == "fail"
    assert bad.message == "label accuracy 0.200 < 0.8 (8 of 40 labels)"
    good = evaluate(spec, obs(VersionStats(100, 0, 0.004, labelled=40, correct=36)))
    assert good.outcome == "pass" and "label accuracy 0.900 on 40 labels" in good.message


MAE = METRICS["mae"]


def test_the_gateway_sums_each_versions_tallies_and_reads_the_models_metric() -> None:
    edges = [
        {2: LabelTally(total=10, correct=0, score=35.0), 1: LabelTally(total=4, score=8.0)},
        {2: LabelTally(total=30, correct=0, score=85.0)},
        {},
    ]
    assert label_totals(edges, 2) == (40, 0, 120.0)
    assert label_totals(edges, 1) == (4, 0, 8.0)
    assert label_totals(edges, 9) == (0, 0, 0.0)
    stats = VersionStats(100, 0, 0.004, *label_totals(edges, 2))
    assert stats.metric(MAE) == 3.0
    assert model_metric("diabetes") == MAE and model_metric("digits") == METRICS["accuracy"]
    assert model_metric("no_such_model") == METRICS["accuracy"]


def test_label_gates_use_the_models_own_metric_and_direction() -> None:
    """A regression's tallies carry the summed MAE (lower is better): ``max_metric`` caps
    it, ``metric_margin`` compares it with the stable version's in the metric's direction,
    ``min_accuracy`` keeps reading the right-answer count."""

    def labels(n: int, mae: float, correct: int = 0) -> VersionStats:
        return VersionStats(100, 0, 0.004, labelled=n, correct=correct, score=mae * n)

    def run(gates: Gates, cand: VersionStats, stable: VersionStats, metric=MAE) -> str:
        spec = RolloutSpec(version=2, gates=gates)
        o = Observation(candidate=cand, stable=stable, elapsed_s=60, metric=metric)
        v = evaluate(spec, o)
        return f"{v.outcome}: {v.message}"

    stable = labels(40, 10.0)
    capped = Gates(max_metric=12.0, min_labels=20)
    assert run(capped, labels(40, 15.0), stable) == "fail: label mae 15.000 > 12 (40 labels)"
    assert run(capped, labels(40, 11.0), stable).startswith("pass: ")
    assert "label mae 11.000 on 40 labels" in run(capped, labels(40, 11.0), stable)
    margin = Gates(metric_margin=1.0, min_labels=20)
    worse = run(margin, labels(40, 12.0), stable)
    assert worse == (
        "fail: label mae 12.000 is 2.000 worse than the stable version's 10.000 "
        "(margin 1, lower is better) (40 labels)"
    )
    assert run(margin, labels(40, 10.5), stable).startswith("pass: ")  # within the margin
    assert run(margin, labels(40, 4.0), stable).startswith("pass: ")  # lower MAE is better
    assert run(margin, labels(40, 12.0), labels(5, 1.0)).startswith("pass: ")  # stable: 5 labels
    assert "label gates skipped (10 of 20 labels)" in run(margin, labels(10, 99.0), stable)
    # a higher-is-better metric: a lower candidate fails the margin and min_metric
    acc = METRICS["accuracy"]
    hi = Gates(metric_margin=0.05, min_metric=0.7, min_labels=20)
    low = run(hi, labels(40, 0.0, correct=24), labels(40, 0.0, correct=36), acc)
    assert "label accuracy 0.600 < 0.7 (40 labels)" in low
    assert "is 0.300 worse than the stable version's 0.900" in low and "higher is better" in low
    assert run(hi, labels(40, 0.0, correct=36), labels(40, 0.0, correct=36), acc).startswith("pass")


def test_pass_needs_window_and_requests() -> None:
    spec = RolloutSpec(version=2, window_s=30, min_requests=50)
    assert evaluate(spec, obs(VersionStats(500), elapsed=29)).message == "observing (29.0 of 30 s)"
    assert (
        evaluate(spec, obs(VersionStats(10), elapsed=31)).message == "10 of 50 candidate requests"
    )


# -- transitions ---------------------------------------------------------------------------
def test_staging_waits_for_every_edge_then_canary() -> None:
    r = staged(rollout(), T0)
    assert r.state == "staging" and split_of(r) == TrafficSplit(stable=1)
    one = {"edge-1": ModelState(ready=[1, 2], rollout=r.id), "edge-2": ModelState(ready=[1])}
    assert staging_step(r, one, T0 + 1) is None
    stale = {**one, "edge-2": ModelState(ready=[1], failed={2: "unloaded"}, rollout=r.id)}
    assert staging_step(r, stale, T0 + 1) is None  # 'unloaded' is not a failure
    both = {**one, "edge-2": ModelState(ready=[1, 2], rollout=r.id)}
    c = staging_step(r, both, T0 + 4)
    assert c is not None and c.state == "canary" and c.ready_ts == T0 + 4
    assert split_of(c) == TrafficSplit(stable=1, candidate=2, candidate_weight=0.1)
    assert "ready on 2 edge(s) 4.0 s after the request" in c.events[-1].message


def test_staging_fails_with_every_edges_reason() -> None:
    r = staged(rollout(), T0)
    refused = "refused: digest-mismatch: model.onnx: SHA-256 differs from the manifest"
    edges = {
        "edge-1": ModelState(ready=[1], failed={2: refused}, rollout=r.id),
        "edge-2": ModelState(ready=[1]),  # has not answered yet
    }
    assert staging_step(r, edges, T0 + 1) is None
    edges["edge-2"] = ModelState(ready=[1], failed={2: refused}, rollout=r.id)
    f = staging_step(r, edges, T0 + 2)
    assert f is not None and f.state == "failed" and f.decided_ts == T0 + 2
    assert f.reason == f"edge-1: {refused}; edge-2: {refused}"
    assert split_of(f) == TrafficSplit(stable=1)


def test_staging_times_out() -> None:
    r = staged(rollout(staging_timeout_s=60), T0)
    edges = {"edge-1": ModelState(ready=[1])}
    assert staging_step(r, edges, T0 + 59) is None
    f = staging_step(r, edges, T0 + 61)
    assert f is not None and f.state == "failed"
    assert f.reason == "not ready within 60 s: edge-1"


def test_canary_stages_then_promotion() -> None:
    r = canary(rollout(stages=(10, 50), window_s=5))
    good = evaluate(r.spec, obs(VersionStats(200, 0, 0.004)))
    r2 = canary_step(r, good, T0 + 10)
    assert r2 is not None and r2.state == "canary" and r2.stage == 1 and r2.weight == 0.5
    assert r2.events[-1].kind == "stage_passed"
    p = canary_step(r2, good, T0 + 20)
    assert p is not None and p.state == "promoted" and p.serving == 2
    assert split_of(p) == TrafficSplit(stable=2)
    assert canary_step(r2, evaluate(r.spec, obs(VersionStats(2))), T0) is None


def test_gate_failure_rolls_back() -> None:
    r = canary(rollout())
    bad = evaluate(r.spec, obs(VersionStats(100, 50, 0.004), elapsed=1))
    b = canary_step(r, bad, T0 + 3)
    assert b is not None and b.state == "rolled_back" and b.serving == 1
    assert b.reason == "gate failed at 10% of traffic: error rate 0.500 > 0.01 (50 of 100 requests)"
    assert split_of(b) == TrafficSplit(stable=1)


def test_without_auto_promote_waits_for_the_command() -> None:
    r = canary(rollout(auto_promote=False))
    good = evaluate(r.spec, obs(VersionStats(200, 0, 0.004)))
    waiting = canary_step(r, good, T0 + 40)
    assert waiting is not None and waiting.state == "canary" and waiting.gates_passed
    assert canary_step(waiting, good, T0 + 41) is None  # the event is recorded once
    promoted = _commanded(waiting, "promote", "ops", T0 + 42)
    assert promoted.state == "promoted" and promoted.reason == "promoted by ops"


def test_commands_are_idempotent_and_checked() -> None:
    r = canary(rollout())
    back = _commanded(r, "rollback", "ops", T0 + 5)
    assert back.state == "rolled_back"
    assert _commanded(back, "rollback", "ops", T0 + 6) is back
    with pytest.raises(Conflict):
        _commanded(back, "promote", "ops", T0 + 6)
    with pytest.raises(Conflict):
        _commanded(staged(rollout(), T0), "promote", "ops", T0)
    p = _commanded(r, "promote", "ops", T0 + 5)
    with pytest.raises(Conflict):
        _commanded(p, "rollback", "ops", T0 + 6)


def test_desired_versions_drop_after_the_drain() -> None:
    r = rollout()
    assert desired_of(r, T0, 1.0) is None
    s = staged(r, T0)
    d = desired_of(s, T0, 1.0)
    assert isinstance(d, DesiredVersions) and d.versions() == [1, 2] and d.rollout == r.id
    p = _commanded(canary(r), "promote", "ops", T0 + 10)
    assert desired_of(p, T0 + 10.5, 1.0).versions() == [1, 2]  # type: ignore[union-attr]
    assert desired_of(p, T0 + 11, 1.0).versions() == [2]  # type: ignore[union-attr]
    b = _commanded(canary(r), "rollback", "ops", T0 + 10)
    assert desired_of(b, T0 + 11, 1.0).versions() == [1]  # type: ignore[union-attr]


def test_settled_once_no_edge_serves_the_dropped_version() -> None:
    p = _commanded(canary(rollout()), "promote", "ops", T0 + 10)
    assert settle(p, {"edge-1": ModelState(ready=[1, 2])}, T0 + 12) is None
    s = settle(p, {"edge-1": ModelState(ready=[2])}, T0 + 13)
    assert s is not None and s.settled and s.events[-1].kind == "settled"
    assert settle(s, {"edge-1": ModelState(ready=[2])}, T0 + 14) is None


def test_record_round_trips_as_json() -> None:
    r = canary(rollout(stages=(10, 50), gates=Gates(min_accuracy=0.9)))
    assert Rollout.model_validate_json(r.model_dump_json()) == r


# -- counters ------------------------------------------------------------------------------
def test_version_counts_and_quantile() -> None:
    stats = RequestStats()
    for _ in range(98):
        stats.observe("digits", "2", "edge-1", 200, 0.0015)
    stats.observe("digits", "2", "edge-2", 500, 0.0015)
    stats.observe("digits", "2", "edge-2", 499, 0.0015)
    stats.observe("digits", "1", "edge-1", 200, 0.3)
    c = version_counts(stats, "digits", 2)
    assert (c.requests, c.errors) == (99, 1)
    assert c.since(Counts(50, 1, c.latency)).requests == 49
    # 100 samples in the (1 ms, 2 ms] bucket: the 99th percentile interpolates to 1.99 ms
    assert quantile(c.latency, 0.99) == pytest.approx(0.00199)
    assert quantile(version_counts(stats, "digits", 1).latency, 0.99) == pytest.approx(
        0.25 + 0.25 * 0.99
    )
    assert quantile(Counts().latency, 0.99) is None
    inf = [0] * len(LATENCY_BUCKETS) + [3]
    assert quantile(inf, 0.5) == LATENCY_BUCKETS[-1]


def test_label_tally_on_the_wire() -> None:
    state = ModelState(
        ready=[1, 2], rollout="r-0123456789ab", labels={2: LabelTally(total=3, correct=2)}
    )
    assert ModelState.decode(state.encode()) == state
