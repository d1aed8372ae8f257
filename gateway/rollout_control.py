"""Drives rollouts: commands from the API, a tick that moves each rollout on, and effects.

Each tick, per model with a rollout: read the record (KV), apply its traffic split (when
the record has moved since this gateway last applied it, so an operator's routing change
holds until the rollout moves again), decide the next state (:mod:`gateway.rollout_machine`) from
the fleet's heartbeats and the gates' observation, write it with compare-and-set, apply
the new split, then write the desired versions edges follow. The split always moves before
the desired versions do, so the gateway stops routing to a version before any edge drops
it. On start-up (before the gateway serves) :meth:`RolloutController.bind` applies every
recorded split, so a restarted gateway resumes where the record says.

The gates read the per-version request counts and latency histogram the data plane keeps
for its metrics (:class:`gateway.metrics.RequestStats`): nothing is added to the request
path. With several gateway replicas, each publishes its counts and only the holder of the
lease (:mod:`gateway.rollout_lease`) decides, from the sum over replicas
(:mod:`gateway.gate_counts`). Counts are taken as differences from the stage's baseline,
recorded in KV when the stage began, so a replica that takes over mid-stage goes on from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext
from prometheus_client import Counter, Gauge

from fedcore.errors import ModelSpecError
from fedcore.models import get_spec
from fedcore.task import METRICS, MetricSpec
from fedcore.wire import LabelTally, ModelState
from gateway.errors import GatewayError, NotFound, Unavailable
from gateway.gate_counts import Baseline, Pair, SharedCounts, version_counts
from gateway.metrics import LATENCY_BUCKETS
from gateway.rollout_lease import Lease
from gateway.rollout_machine import (
    Observation,
    Rollout,
    RolloutSpec,
    State,
    VersionStats,
    canary_step,
    desired_of,
    evaluate,
    new_rollout,
    promoted,
    rolled_back,
    settle,
    split_of,
    staged,
    staging_step,
)
from gateway.rollout_store import Conflict, RolloutStore
from gateway.state import GatewayState

log = logging.getLogger(__name__)

STATES: tuple[State, ...] = ("pending", "staging", "canary", "promoted", "rolled_back", "failed")
ATTEMPTS = 4


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram over :data:`LATENCY_BUCKETS` (last: +Inf),
    interpolated within its bucket as Prometheus' ``histogram_quantile`` does."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n > 0 and seen + n >= rank:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - seen) / n
        seen += n
    return LATENCY_BUCKETS[-1]


class RolloutMetrics:
    """Rollout events, state and canary weight, in the gateway's registry."""

    def __init__(self, state: GatewayState) -> None:
        r = state.metrics.registry
        self.events = Counter(
            "fedgate_gateway_rollout_events",
            "Rollout decisions and steps recorded by this gateway, by model and kind",
            ["model", "kind"],
            registry=r,
        )
        self.state = Gauge(
            "fedgate_gateway_rollout_state",
            "1 for the state of each model's latest rollout",
            ["model", "state"],
            registry=r,
        )
        self.weight = Gauge(
            "fedgate_gateway_rollout_canary_weight",
            "Share of the model's unversioned traffic sent to the rollout's candidate",
            ["model"],
            registry=r,
        )

    def show(self, r: Rollout) -> None:
        for s in STATES:
            self.state.labels(r.model, s).set(1 if s == r.state else 0)
        self.weight.labels(r.model).set(r.weight)

    def recorded(self, before: Rollout | None, after: Rollout) -> None:
        known = {(e.ts, e.kind) for e in before.events} if before is not None else set()
        for event in after.events:
            if (event.ts, event.kind) not in known:
                self.events.labels(after.model, event.kind).inc()
                log.info(
                    "rollout %s of %s: %s: %s",
                    after.id,
                    after.model,
                    event.kind,
                    event.message,
                    extra={"model": after.model, "rollout": after.id, "event": event.kind},
                )


@dataclass
class RolloutController:
    """One per gateway; unbound (no NATS) it refuses commands with 503.

    Every replica applies the recorded splits and publishes its counts; only the one holding
    the lease (:mod:`gateway.rollout_lease`) moves rollouts on, from the counts of every
    replica added up (:mod:`gateway.gate_counts`)."""

    state: GatewayState
    clock: Callable[[], float] = time.time
    tick_s: float = 0.2
    drain_s: float = 1.0
    instance: str = "gateway"
    lease_ttl_s: float = 3.0
    store: RolloutStore | None = None
    lease: Lease | None = None
    shared: SharedCounts | None = None
    metrics: RolloutMetrics = field(init=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _baselines: dict[tuple[str, int], Baseline] = field(default_factory=dict)
    _totals: dict[str, Pair] = field(default_factory=dict)  # rollout id -> fleet-wide counts
    _forgotten: set[str] = field(default_factory=set)
    _written: dict[str, tuple[int, int | None, str]] = field(default_factory=dict)
    _models: set[str] = field(default_factory=set)
    _shown: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _closing: bool = False

    def __post_init__(self) -> None:
        self.metrics = RolloutMetrics(self.state)

    # -- lifecycle -------------------------------------------------------------------------
    async def bind(self, js: JetStreamContext, replicas: int = 1) -> None:
        """Open the buckets (created or scaled up to ``replicas``) and apply every recorded
        split (call before serving)."""
        self.store = await RolloutStore.open(js, replicas)
        self.lease = Lease(self.store.kv, self.instance, self.lease_ttl_s)
        self.shared = SharedCounts(js, self.store.kv, self.instance)
        for model in await self.store.models():
            found = await self.store.current(model)
            if found is not None:
                self._apply(found[0])
                if found[0].active:
                    log.info("resuming rollout %s of %s (%s)", found[0].id, model, found[0].state)
            desired = await self.store.desired(model)
            if desired is not None:
                self._written[model] = (desired.stable, desired.candidate, desired.rollout)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the tick loop (:meth:`stop_loop`), then give the lease up."""
        await self.stop_loop()
        if self.lease is not None:
            await self.lease.release()

    async def stop_loop(self) -> None:
        """Stop the tick loop and keep the lease (not renewed: another replica takes it
        once it stands still). A cancellation can be lost inside a NATS call (asyncio's
        wait_for in Python 3.11 returns a result that arrived with the cancel), so the loop
        also checks ``_closing``, and the cancel is repeated until the task is done."""
        self._closing = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()

    def _store(self) -> RolloutStore:
        if self.store is None:
            raise Unavailable("rollouts need the NATS bus, which is not connected")
        return self.store

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def _run(self) -> None:
        listed = 0.0
        while not self._closing:
            try:
                if time.monotonic() - listed > 2.0:  # rollouts other gateways started
                    self._models.update(await self._store().models())
                    listed = time.monotonic()
                leading = self.lease is None or await self.lease.hold()
                for model in sorted(self._models):
                    await self.tick(model, decide=leading)
            except (NatsError, TimeoutError, GatewayError) as exc:
                log.warning("rollout tick failed: %r", exc)
            except Exception:
                log.exception("rollout tick failed")
            await asyncio.sleep(self.tick_s)

    # -- the tick --------------------------------------------------------------------------
    async def tick(self, model: str, decide: bool = True) -> Rollout | None:
        """Apply ``model``'s recorded split and publish this replica's counts; when
        ``decide`` (the lease holder), move the rollout on by at most one step. Returns the
        record as it stands."""
        store = self._store()
        async with self._lock(model):
            found = await store.current(model)
            if found is None:
                return None
            r, revision = found
            self._apply(r)
            await self._share(r, decide)
            if not decide:
                return r
            now = self.clock()
            nxt = self._decide(r, now)
            if nxt is not None:
                try:
                    await store.replace(nxt, revision)
                except Conflict:
                    return r  # another writer moved it: the next tick reads it again
                self.metrics.recorded(r, nxt)
                r = nxt
                self._apply(r)
            await self._write_desired(r, now)
            return r

    def _decide(self, r: Rollout, now: float) -> Rollout | None:
        if r.state == "pending":
            return staged(r, now)
        if r.state == "staging":
            return staging_step(r, self.edges(r.model), now)
        if r.state == "canary":
            return canary_step(r, evaluate(r.spec, self.observe(r)), now)
        if r.decided_ts is not None and now >= r.decided_ts + self.drain_s:
            return settle(r, self.edges(r.model), now)
        return None

    async def _share(self, r: Rollout, decide: bool) -> None:
        """Publish this replica's counts of an active rollout; the holder also reads every
        replica's (and the stage's baseline) for the gates, and clears a finished one's."""
        if self.shared is None:
            return
        if not r.active:
            if decide and r.id not in self._forgotten:
                await self.shared.forget(r.model, r.id)
                self._forgotten.add(r.id)
                self._totals.pop(r.id, None)
            return
        stats = self.state.metrics.stats
        mine = (version_counts(stats, r.model, r.version), version_counts(stats, r.model, r.stable))
        await self.shared.publish(r.model, r.id, mine)
        if decide and r.state == "canary":
            self._totals[r.id] = await self.shared.total(r.model, r.id)
            key = (r.id, r.stage)
            if key not in self._baselines:
                self._baselines[key] = await self.shared.baseline(
                    r.model, r.id, r.stage, self.clock()
                )

    def _apply(self, r: Rollout) -> None:
        """Set the split ``r`` calls for, if ``r`` has moved since this gateway last did."""
        moved = (r.id, r.state, r.stage)
        if self._shown.get(r.model) != moved:
            self.state.router.set_split(r.model, split_of(r))
            self._shown[r.model] = moved
        self.metrics.show(r)
        if not r.active:
            for key in [k for k in self._baselines if k[0] == r.id]:
                del self._baselines[key]

    async def _write_desired(self, r: Rollout, now: float) -> None:
        desired = desired_of(r, now, self.drain_s)
        if desired is None:
            return
        key = (desired.stable, desired.candidate, desired.rollout)
        if self._written.get(r.model) == key:
            return
        await self._store().put_desired(desired)
        self._written[r.model] = key
        log.info(
            "desired versions of %s: %s",
            r.model,
            desired.versions(),
            extra={"model": r.model, "rollout": r.id},
        )

    # -- what the gates see ----------------------------------------------------------------
    def edges(self, model: str) -> dict[str, ModelState]:
        """Fresh edges serving some version of ``model``, with their state of it."""
        return {
            e.edge_id: e.models[model]
            for e in self.state.fleet.fresh()
            if model in e.models and e.models[model].ready
        }

    def observe(self, r: Rollout) -> Observation:
        """The current stage's traffic per version (and the candidate's label tallies): every
        replica's, as last read by :meth:`tick`, or this replica's alone (no NATS yet)."""
        cand, stable = self._totals.get(r.id) or self._local(r)
        key = (r.id, r.stage)
        base = self._baselines.get(key)
        if base is None:
            base = self._baselines[key] = Baseline(self.clock(), cand, stable)
        tallies = [e.labels for e in self.edges(r.model).values()]
        c, s = cand.since(base.candidate), stable.since(base.stable)
        return Observation(
            candidate=VersionStats(
                c.requests, c.errors, quantile(c.latency, 0.99), *label_totals(tallies, r.version)
            ),
            stable=VersionStats(
                s.requests, s.errors, quantile(s.latency, 0.99), *label_totals(tallies, r.stable)
            ),
            elapsed_s=self.clock() - base.started,
            metric=model_metric(r.model),
        )

    def _local(self, r: Rollout) -> Pair:
        stats = self.state.metrics.stats
        return version_counts(stats, r.model, r.version), version_counts(stats, r.model, r.stable)

    # -- commands --------------------------------------------------------------------------
    def serving_version(self, model: str) -> int | None:
        split = self.state.router.splits.get(model)
        return split.stable if split is not None else self.state.router.default_version(model)

    async def start(self, model: str, spec: RolloutSpec, actor: str) -> tuple[Rollout, bool]:
        """Start a rollout; ``(rollout, created)``. The same spec again returns the rollout
        it started (``created`` False); another while one is active is a :class:`Conflict`."""
        store = self._store()
        async with self._lock(model):
            for _ in range(ATTEMPTS):
                found = await store.current(model)
                revision: int | None = None
                stable = self.serving_version(model)
                if found is not None:
                    current, revision = found
                    if current.spec == spec and (current.active or current.state == "promoted"):
                        return current, False
                    if current.active:
                        raise Conflict(
                            f"rollout {current.id} of {model} version {current.version} is "
                            f"{current.state}; promote or roll it back first"
                        )
                    stable = current.serving
                if stable is None:
                    raise Unavailable(f"no edge serves model {model!r}: nothing to roll out over")
                if spec.version == stable:
                    raise Conflict(f"version {stable} of {model} is already the serving version")
                if not await store.version_exists(model, spec.version):
                    raise NotFound(f"version {spec.version} of {model} is not in the model store")
                r = new_rollout(model, stable, spec, actor, self.clock())
                try:
                    await store.replace(r, revision)
                except Conflict:
                    continue
                self.metrics.recorded(None, r)
                self._apply(r)
                self._models.add(model)
                return r, True
        raise Conflict(f"rollout of {model} keeps changing concurrently; try again")

    async def command(self, model: str, rollout_id: str, action: str, actor: str) -> Rollout:
        """``promote`` or ``rollback`` rollout ``rollout_id``; repeating one is a no-op."""
        store = self._store()
        async with self._lock(model):
            for _ in range(ATTEMPTS):
                found = await store.current(model)
                if found is None or found[0].id != rollout_id:
                    return await self._not_latest(model, rollout_id, action)
                r, revision = found
                nxt = _commanded(r, action, actor, self.clock())
                if nxt is r:
                    return r
                try:
                    await store.replace(nxt, revision)
                except Conflict:
                    continue
                self.metrics.recorded(r, nxt)
                self._apply(nxt)
                return nxt
        raise Conflict(f"rollout {rollout_id} keeps changing concurrently; try again")

    async def _not_latest(self, model: str, rollout_id: str, action: str) -> Rollout:
        old = await self._store().get(model, rollout_id)
        if old is None:
            raise NotFound(f"model {model!r} has no rollout {rollout_id!r}")
        if old.state == _DONE[action]:
            return old
        raise Conflict(f"rollout {rollout_id} is over ({old.state}); a newer one has started")


_DONE = {"promote": "promoted", "rollback": "rolled_back"}


def _commanded(r: Rollout, action: str, actor: str, now: float) -> Rollout:
    """The record after ``action``; ``r`` itself when it is already done (a no-op)."""
    if r.state == _DONE[action]:
        return r
    if action == "promote":
        if r.state != "canary":
            raise Conflict(f"rollout {r.id} is {r.state}; only a canary can be promoted")
        return promoted(r, now, f"promoted by {actor}")
    if not r.active:
        raise Conflict(f"rollout {r.id} is {r.state}; only an active rollout can be rolled back")
    return rolled_back(r, now, f"rolled back by {actor}")


def label_totals(
    tallies: Sequence[Mapping[int, LabelTally]], version: int
) -> tuple[int, int, float]:
    """(labelled, correct, summed metric) of ``version`` over the edges' tallies."""
    found = [t[version] for t in tallies if version in t]
    return (
        sum(t.total for t in found),
        sum(t.correct for t in found),
        float(sum(t.score for t in found)),
    )


def model_metric(model: str) -> MetricSpec:
    """The model's metric and its direction (accuracy for a model this gateway lacks)."""
    try:
        return get_spec(model).task.metric_spec
    except ModelSpecError:
        return METRICS["accuracy"]
