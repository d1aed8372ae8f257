"""Rollouts as a pure state machine: spec, record, gates and transitions (no I/O here).

``pending`` (recorded) -> ``staging`` (desired versions written; edges fetch, verify and
load the candidate beside the stable version) -> ``canary`` (a share of the unversioned
traffic goes to the candidate while the gates observe it, stage by stage) -> ``promoted``
(all traffic to the candidate; the old version is dropped by the edges) or
``rolled_back`` (the candidate is dropped, the reason recorded). ``failed``: the candidate
never became ready on every edge (an edge refused or could not load it, or staging timed
out). Every change is an event in the record.

The gates see an :class:`Observation`: per-version request, error and latency counts the
gateway keeps on its data path anyway (differences since the stage began) and the label
tallies edges report for the candidate. :func:`evaluate` is where the verdict is made.
The effects of a state, the traffic split (:func:`split_of`) and the desired versions
(:func:`desired_of`), are functions of the record, so a restarted gateway derives them
again from what it reads back.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcore.task import METRICS, MetricSpec
from fedcore.wire import ROLLOUT_ID, DesiredVersions, ModelState
from gateway.routing import TrafficSplit

State = Literal["pending", "staging", "canary", "promoted", "rolled_back", "failed"]
ACTIVE: frozenset[str] = frozenset({"pending", "staging", "canary"})
BENIGN_REASONS = frozenset({"unloaded"})
"""Triton's index reason for a version it unloaded on purpose: not a failure."""
MAX_EVENTS = 200
P99_MIN_REQUESTS = 100
"""The latency gate compares p99s only over this many requests of each version at least
(the p99 of fewer requests is their maximum: one slow request would decide)."""


class Gates(BaseModel):
    """When a canary stage fails. ``None`` turns a gate off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_error_rate: float | None = Field(
        default=0.01, ge=0, le=1, description="share of candidate requests answered 5xx"
    )
    max_p99_ratio: float | None = Field(
        default=2.0, gt=0, description="candidate p99 latency over the stable version's p99"
    )
    p99_floor_ms: float = Field(
        default=10.0, ge=0, description="the latency gate ignores a candidate p99 below this"
    )
    min_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="share of feedback labels the candidate got right"
    )
    min_metric: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="the candidate's mean label metric (the model's own) is below this",
    )
    max_metric: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="the candidate's mean label metric is above this (MAE, MSE: lower wins)",
    )
    metric_margin: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="the candidate's label metric is worse than the stable version's by more "
        "than this, in the metric's direction",
    )
    min_labels: int = Field(
        default=20, ge=1, description="labels (per version compared) before a label gate decides"
    )

    @property
    def label_gated(self) -> bool:
        return any(
            v is not None
            for v in (self.min_accuracy, self.min_metric, self.max_metric, self.metric_margin)
        )


class RolloutSpec(BaseModel):
    """What ``POST /v1/models/{model}/rollouts`` asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, description="the candidate version (signed, in the model store)")
    canary: float = Field(
        default=10.0, gt=0, le=100, description="percent of traffic to the candidate"
    )
    stages: tuple[float, ...] | None = Field(
        default=None, description="percent per stage, ascending (overrides canary)"
    )
    gates: Gates = Field(default_factory=Gates)
    window_s: float = Field(default=30.0, gt=0, le=86400, description="observation per stage")
    min_requests: int = Field(default=50, ge=1, description="candidate requests per stage")
    staging_timeout_s: float = Field(default=300.0, gt=0, le=86400)
    auto_promote: bool = Field(default=True, description="promote when the last stage passes")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is None:
            return v
        if not v or len(v) > 10:
            raise ValueError("stages must list 1 to 10 percentages")
        if any(not 0 < p <= 100 for p in v) or list(v) != sorted(set(v)):
            raise ValueError("stages must be strictly ascending percentages in (0, 100]")
        return v

    def weights(self) -> tuple[float, ...]:
        """The candidate's share of the traffic per stage, as fractions."""
        return tuple(p / 100 for p in (self.stages or (self.canary,)))


class RolloutEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ts: float
    kind: str
    message: str


class Rollout(BaseModel):
    """One rollout of ``version`` over ``stable``, as stored in KV."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ROLLOUT_ID.pattern)
    model: str
    version: int = Field(ge=1)
    stable: int = Field(ge=1)
    spec: RolloutSpec
    state: State
    stage: int = 0
    created_ts: float
    updated_ts: float
    stage_started_ts: float | None = None
    decided_ts: float | None = None
    ready_ts: float | None = None
    reason: str | None = None
    actor: str
    settled: bool = False
    gates_passed: bool = False
    events: tuple[RolloutEvent, ...] = ()

    @model_validator(mode="after")
    def _versions(self) -> Rollout:
        if self.version == self.stable:
            raise ValueError("the candidate version must differ from the stable one")
        return self

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def weight(self) -> float:
        """The candidate's current share of unversioned traffic."""
        if self.state != "canary":
            return 0.0
        return self.spec.weights()[min(self.stage, len(self.spec.weights()) - 1)]

    @property
    def serving(self) -> int:
        """The version all traffic goes to once this rollout is over (or if it ended now)."""
        return self.version if self.state == "promoted" else self.stable

    def moved(self, now: float, kind: str, message: str, **changes: object) -> Rollout:
        """A copy with ``changes`` applied and the event appended."""
        events = (*self.events, RolloutEvent(ts=now, kind=kind, message=message))[-MAX_EVENTS:]
        return self.model_copy(update={**changes, "events": events, "updated_ts": now})


def new_rollout(model: str, stable: int, spec: RolloutSpec, actor: str, now: float) -> Rollout:
    """A ``pending`` rollout with a fresh id."""
    r = Rollout(
        id=f"r-{secrets.token_hex(6)}",
        model=model,
        version=spec.version,
        stable=stable,
        spec=spec,
        state="pending",
        created_ts=now,
        updated_ts=now,
        actor=actor,
    )
    return r.moved(now, "created", f"{actor} asked to roll out version {spec.version} of {model}")


# -- effects -------------------------------------------------------------------------------
def split_of(r: Rollout) -> TrafficSplit:
    """The traffic split the record calls for (terminal states pin the serving version)."""
    if r.state == "canary":
        return TrafficSplit(stable=r.stable, candidate=r.version, candidate_weight=r.weight)
    return TrafficSplit(stable=r.serving)


def desired_of(r: Rollout, now: float, drain_s: float) -> DesiredVersions | None:
    """The versions edges should serve; None while ``pending``.

    After a decision the dropped version stays desired for ``drain_s`` more: the split has
    already moved the traffic, so requests routed to it before can finish first.
    """
    if r.state == "pending":
        return None
    if not r.active and r.decided_ts is not None and now >= r.decided_ts + drain_s:
        return DesiredVersions(model=r.model, stable=r.serving, rollout=r.id, ts=now)
    return DesiredVersions(
        model=r.model, stable=r.stable, candidate=r.version, rollout=r.id, ts=now
    )


# -- observation and gates -----------------------------------------------------------------
@dataclass(frozen=True)
class VersionStats:
    """One version's traffic in the current stage (or labels since it was first served)."""

    requests: int = 0
    errors: int = 0
    p99_s: float | None = None
    labelled: int = 0
    correct: int = 0
    score: float = 0.0
    """the sum of the model's per-sample metric over the labelled samples"""

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def metric(self, m: MetricSpec) -> float | None:
        """Metric ``m`` over the labelled samples (their mean; accuracy from the exact
        count of right answers)."""
        if m.name == "accuracy":
            return self.accuracy
        return self.score / self.labelled if self.labelled else None


@dataclass(frozen=True)
class Observation:
    candidate: VersionStats
    stable: VersionStats
    elapsed_s: float
    metric: MetricSpec = METRICS["accuracy"]
    """the model's metric and its direction (the label tallies' ``score``)"""


@dataclass(frozen=True)
class Verdict:
    """``fail`` (roll back), ``pass`` (the stage is over) or ``wait`` (keep observing)."""

    outcome: Literal["pass", "fail", "wait"]
    message: str


def _gate_failures(spec: RolloutSpec, obs: Observation) -> list[str]:
    g, c, s = spec.gates, obs.candidate, obs.stable
    enough = c.requests >= spec.min_requests
    p99_sample = max(spec.min_requests, P99_MIN_REQUESTS)
    out = []
    if enough and g.max_error_rate is not None and c.error_rate > g.max_error_rate:
        out.append(
            f"error rate {c.error_rate:.3f} > {g.max_error_rate:g} "
            f"({c.errors} of {c.requests} requests)"
        )
    if (
        g.max_p99_ratio is not None
        and c.p99_s is not None
        and s.p99_s is not None
        and min(c.requests, s.requests) >= p99_sample
        and c.p99_s * 1000 > g.p99_floor_ms
        and c.p99_s > g.max_p99_ratio * s.p99_s
    ):
        out.append(
            f"p99 latency {c.p99_s * 1000:.1f} ms > {g.max_p99_ratio:g} x stable "
            f"{s.p99_s * 1000:.1f} ms"
        )
    return out + _label_failures(g, obs)


def _label_failures(g: Gates, obs: Observation) -> list[str]:
    """The label gates, on the candidate's feedback labels (and the stable version's for
    ``metric_margin``), each once ``min_labels`` labels were joined."""
    c, s, m = obs.candidate, obs.stable, obs.metric
    value, accuracy = c.metric(m), c.accuracy
    if c.labelled < g.min_labels or value is None or accuracy is None:
        return []
    out = []
    of = f"({c.labelled} labels)"
    if g.min_accuracy is not None and accuracy < g.min_accuracy:
        out.append(
            f"label accuracy {accuracy:.3f} < {g.min_accuracy:g} "
            f"({c.correct} of {c.labelled} labels)"
        )
    if g.min_metric is not None and value < g.min_metric:
        out.append(f"label {m.name} {value:.3f} < {g.min_metric:g} {of}")
    if g.max_metric is not None and value > g.max_metric:
        out.append(f"label {m.name} {value:.3f} > {g.max_metric:g} {of}")
    stable = s.metric(m)
    if g.metric_margin is not None and s.labelled >= g.min_labels and stable is not None:
        worse = m.worse_by(stable, value)
        if worse > g.metric_margin:
            out.append(
                f"label {m.name} {value:.3f} is {worse:.3f} worse than the stable version's "
                f"{stable:.3f} (margin {g.metric_margin:g}, {m.direction} is better) {of}"
            )
    return out


def evaluate(spec: RolloutSpec, obs: Observation) -> Verdict:
    """The gates' verdict on one stage: fail as soon as a gate fails on enough data, pass
    once the window is over with enough requests, else wait."""
    failures = _gate_failures(spec, obs)
    if failures:
        return Verdict("fail", "; ".join(failures))
    c, g = obs.candidate, spec.gates
    if obs.elapsed_s < spec.window_s:
        return Verdict("wait", f"observing ({obs.elapsed_s:.1f} of {spec.window_s:g} s)")
    if c.requests < spec.min_requests:
        return Verdict("wait", f"{c.requests} of {spec.min_requests} candidate requests")
    parts = [f"{c.requests} requests", f"error rate {c.error_rate:.3f}"]
    if c.p99_s is not None:
        parts.append(f"p99 {c.p99_s * 1000:.1f} ms")
    if g.label_gated:
        m = obs.metric
        value = c.metric(m)
        if c.labelled >= g.min_labels and value is not None:
            parts.append(f"label {m.name} {value:.3f} on {c.labelled} labels")
        else:
            parts.append(f"label gates skipped ({c.labelled} of {g.min_labels} labels)")
    return Verdict("pass", ", ".join(parts))


# -- transitions ---------------------------------------------------------------------------
def staged(r: Rollout, now: float) -> Rollout:
    """``pending`` -> ``staging`` once the desired versions are written."""
    return r.moved(
        now,
        "staging",
        f"edges fetch, verify and load version {r.version} beside version {r.stable}",
        state="staging",
    )


def staging_step(r: Rollout, edges: Mapping[str, ModelState], now: float) -> Rollout | None:
    """Decide a ``staging`` rollout from the edges serving the model (id -> its state).

    Every edge must report the candidate ready (``canary``); when every edge has answered
    and one refused or failed, the rollout fails with each edge's reason. None: wait.
    """
    reported = {e: s for e, s in edges.items() if s.rollout == r.id}
    failures = {
        e: _reason(s.failed[r.version])
        for e, s in sorted(reported.items())
        if r.version in s.failed
        and r.version not in s.ready
        and s.failed[r.version] not in BENIGN_REASONS
    }
    ready = [e for e, s in reported.items() if r.version in s.ready]
    waited = now - r.created_ts
    if edges and len(reported) == len(edges) and failures:
        detail = "; ".join(f"{e}: {why}" for e, why in failures.items())
        return r.moved(now, "failed", detail, state="failed", reason=detail, decided_ts=now)
    if edges and len(ready) == len(edges):
        took = f"{waited:.1f} s after the request"
        return r.moved(
            now,
            "canary",
            f"version {r.version} ready on {len(ready)} edge(s) {took}; "
            f"{r.spec.weights()[0]:.0%} of traffic to it",
            state="canary",
            stage=0,
            stage_started_ts=now,
            ready_ts=now,
        )
    if waited > r.spec.staging_timeout_s:
        missing = sorted(set(edges) - set(ready)) or ["no edge serves the model"]
        detail = f"not ready within {r.spec.staging_timeout_s:g} s: {', '.join(missing)}"
        if failures:
            detail += "; " + "; ".join(f"{e}: {why}" for e, why in failures.items())
        return r.moved(now, "failed", detail, state="failed", reason=detail, decided_ts=now)
    return None


def _reason(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


def canary_step(r: Rollout, verdict: Verdict, now: float) -> Rollout | None:
    """Decide a ``canary`` rollout from its gates' verdict. None: no change."""
    if verdict.outcome == "wait":
        return None
    if verdict.outcome == "fail":
        return rolled_back(r, now, f"gate failed at {r.weight:.0%} of traffic: {verdict.message}")
    last = r.stage + 1 >= len(r.spec.weights())
    if not last:
        nxt = r.spec.weights()[r.stage + 1]
        msg = f"stage {r.stage + 1} passed ({verdict.message}); {nxt:.0%} of traffic next"
        return r.moved(now, "stage_passed", msg, stage=r.stage + 1, stage_started_ts=now)
    if r.spec.auto_promote:
        return promoted(r, now, f"gates passed ({verdict.message})")
    if r.gates_passed:
        return None
    msg = f"gates passed ({verdict.message}); waiting for a promote command"
    return r.moved(now, "gates_passed", msg, gates_passed=True)


def promoted(r: Rollout, now: float, why: str) -> Rollout:
    return r.moved(
        now,
        "promoted",
        f"{why}; all traffic to version {r.version}, version {r.stable} is unloaded once "
        "in-flight requests finish",
        state="promoted",
        reason=why,
        decided_ts=now,
    )


def rolled_back(r: Rollout, now: float, why: str) -> Rollout:
    return r.moved(
        now,
        "rolled_back",
        f"{why}; all traffic to version {r.stable}, version {r.version} is unloaded",
        state="rolled_back",
        reason=why,
        decided_ts=now,
    )


def settle(r: Rollout, edges: Mapping[str, ModelState], now: float) -> Rollout | None:
    """Mark a decided rollout settled once no edge serves the dropped version any more."""
    if r.active or r.settled:
        return None
    dropped = r.stable if r.state == "promoted" else r.version
    if any(dropped in s.ready for s in edges.values()):
        return None
    return r.moved(now, "settled", f"version {dropped} is served by no edge any more", settled=True)
