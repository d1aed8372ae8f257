"""What a rollout's gates count, added up over every gateway replica.

Each gateway counts the requests it routed per version (:class:`gateway.metrics.RequestStats`).
For a rollout's gates to see the whole traffic, whichever replica counted it, every replica
publishes its cumulative counts of the rollout's two versions to the rollouts bucket, key
``=counts.<model>.<rollout>.<instance>``, and the acting controller adds them up. A stage's
baseline (the totals when the stage began) is kept there too, ``=baseline.<model>.<rollout>.
<stage>``, written once by compare-and-set, so a controller that takes over mid-stage goes on
from the same baseline instead of restarting the stage's window. Keys start with ``=``, which
no model name can, and hold a dot, so they are never taken for a model's rollout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from fedcore.kv import kv_keys
from fedcore.wire import ROLLOUTS_BUCKET
from gateway.metrics import LATENCY_BUCKETS, RequestStats


@dataclass(frozen=True)
class Counts:
    """Cumulative counts of one version (on one gateway, or added over several)."""

    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)

    def since(self, base: Counts) -> Counts:
        return Counts(
            self.requests - base.requests,
            self.errors - base.errors,
            tuple(a - b for a, b in zip(self.latency, base.latency, strict=True)),
        )

    def plus(self, other: Counts) -> Counts:
        return Counts(
            self.requests + other.requests,
            self.errors + other.errors,
            tuple(a + b for a, b in zip(self.latency, other.latency, strict=True)),
        )

    def to_json(self) -> list[object]:
        return [self.requests, self.errors, list(self.latency)]

    @classmethod
    def from_json(cls, data: object) -> Counts:
        """Counts from :meth:`to_json`; empty counts for anything malformed."""
        if isinstance(data, list) and len(data) == 3:
            requests, errors, latency = data
            if (
                isinstance(requests, int)
                and isinstance(errors, int)
                and isinstance(latency, list)
                and len(latency) == len(LATENCY_BUCKETS) + 1
                and all(isinstance(n, int) for n in latency)
            ):
                return cls(requests, errors, tuple(latency))
        return cls()


def version_counts(stats: RequestStats, model: str, version: int) -> Counts:
    """Requests (client disconnects aside), 5xx answers and latency of ``model`` ``version``."""
    label = str(version)
    requests = errors = 0
    for (m, v, _edge, status), n in list(stats.requests.items()):
        if m == model and v == label and status != 499:
            requests += n
            if status >= 500:
                errors += n
    series = stats.latency.get((model, label))
    latency = tuple(series.counts) if series is not None else Counts().latency
    return Counts(requests, errors, latency)


Pair = tuple[Counts, Counts]
"""(candidate, stable)."""


@dataclass(frozen=True)
class Baseline:
    """The fleet-wide totals when a stage began, and when (the controller's clock)."""

    started: float
    candidate: Counts
    stable: Counts


class SharedCounts:
    """This replica's published counts and the fleet-wide sums, in the rollouts bucket."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, instance: str) -> None:
        self.js = js
        self.kv = kv
        self.instance = instance
        self._published: dict[tuple[str, str], Pair] = {}

    async def publish(self, model: str, rollout: str, counts: Pair) -> None:
        """Put this replica's cumulative counts of the rollout's versions (when changed)."""
        if self._published.get((model, rollout)) == counts:
            return
        value = {"candidate": counts[0].to_json(), "stable": counts[1].to_json()}
        await self.kv.put(f"=counts.{model}.{rollout}.{self.instance}", json.dumps(value).encode())
        self._published[(model, rollout)] = counts

    async def total(self, model: str, rollout: str) -> Pair:
        """Every replica's latest counts of the rollout, added up."""
        cand, stable = Counts(), Counts()
        for key in await kv_keys(self.js, ROLLOUTS_BUCKET, f"=counts.{model}.{rollout}.*"):
            data = await self._get(key)
            if isinstance(data, dict):
                cand = cand.plus(Counts.from_json(data.get("candidate")))
                stable = stable.plus(Counts.from_json(data.get("stable")))
        return cand, stable

    async def baseline(self, model: str, rollout: str, stage: int, now: float) -> Baseline:
        """The stage's baseline: the one recorded, else the totals now (recorded once)."""
        key = f"=baseline.{model}.{rollout}.{stage}"
        data = await self._get(key)
        if isinstance(data, dict) and isinstance(data.get("started"), int | float):
            return Baseline(
                float(data["started"]),
                Counts.from_json(data.get("candidate")),
                Counts.from_json(data.get("stable")),
            )
        cand, stable = await self.total(model, rollout)
        value = {"started": now, "candidate": cand.to_json(), "stable": stable.to_json()}
        try:
            await self.kv.create(key, json.dumps(value).encode())
        except KeyWrongLastSequenceError:
            return await self.baseline(model, rollout, stage, now)  # another replica's first
        return Baseline(now, cand, stable)

    async def forget(self, model: str, rollout: str) -> None:
        """Remove a finished rollout's counts and baselines."""
        self._published = {k: v for k, v in self._published.items() if k != (model, rollout)}
        for prefix in ("=counts", "=baseline"):
            for key in await kv_keys(self.js, ROLLOUTS_BUCKET, f"{prefix}.{model}.{rollout}.*"):
                await self.kv.purge(key)

    async def _get(self, key: str) -> object:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        try:
            return json.loads(entry.value or b"null")
        except ValueError:
            return None
