"""Several gateway replicas agree (#17 item 2), against a real nats-server: one lease decides
who moves rollouts on, the gates count every replica's traffic, and when the acting replica
dies in the middle of a canary another takes over within seconds and finishes the rollout
from the same stage baseline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from fedcore.artifact_store import MODELS_BUCKET, model_object_name
from fedcore.kv import kv_bucket
from fedcore.wire import ROLLOUTS_BUCKET
from gateway.app import create_app
from gateway.auth import generate_key, key_line
from gateway.fleet import Fleet
from gateway.gate_counts import Counts, SharedCounts
from gateway.metrics import LATENCY_BUCKETS
from gateway.rollout_control import RolloutController
from gateway.rollout_lease import Lease, lease_holder
from gateway.settings import GatewaySettings
from tests.conftest import NatsServer
from tests.test_rollout_api import MODEL, Api, connect


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_one_lease_holder_and_takeover_after_silence(nats_server: NatsServer) -> None:
    nc = await connect(nats_server)
    kv = await kv_bucket(nc.jetstream(), ROLLOUTS_BUCKET)
    clock = Clock()
    a, b = Lease(kv, "gw-a", 3.0, clock), Lease(kv, "gw-b", 3.0, clock)
    assert await a.hold() and not await b.hold()
    assert await lease_holder(kv) == "gw-a"
    for _ in range(5):  # a renews: b never takes it, however long it watches
        clock.now += 1.0
        assert await a.hold() and not await b.hold()
    clock.now += 2.0  # a is silent (dead) ...
    assert not await b.hold()
    clock.now += 3.5  # ... for longer than the TTL of b's own clock: b takes over
    assert await b.hold() and await lease_holder(kv) == "gw-b"
    assert not await a.hold() and not a.holding  # a's renewal loses the compare-and-set
    await b.release()
    assert await lease_holder(kv) is None
    assert await a.hold()  # a released lease is free at once
    await nc.close()


def counts(requests: int, errors: int = 0) -> Counts:
    latency = [0] * (len(LATENCY_BUCKETS) + 1)
    latency[0] = requests
    return Counts(requests, errors, tuple(latency))


async def test_counts_add_up_over_replicas_and_the_baseline_is_shared(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server)
    js = nc.jetstream()
    kv = await kv_bucket(js, ROLLOUTS_BUCKET)
    a, b = SharedCounts(js, kv, "gw-a"), SharedCounts(js, kv, "gw-b")
    await a.publish(MODEL, "r-1", (counts(10, 1), counts(100)))
    await b.publish(MODEL, "r-1", (counts(15), counts(50)))
    await b.publish(MODEL, "r-2", (counts(999), counts(999)))  # another rollout: not added
    cand, stable = await a.total(MODEL, "r-1")
    assert (cand.requests, cand.errors, stable.requests) == (25, 1, 150)
    assert cand.latency[0] == 25
    first = await a.baseline(MODEL, "r-1", 0, now=5.0)
    await a.publish(MODEL, "r-1", (counts(40, 1), counts(130)))
    taken_over = await b.baseline(MODEL, "r-1", 0, now=9.0)  # reads a's, not the totals now
    assert taken_over == first and first.started == 5.0 and first.candidate.requests == 25
    await a.forget(MODEL, "r-1")
    assert (await b.total(MODEL, "r-1"))[0].requests == 0
    assert (await b.total(MODEL, "r-2"))[0].requests == 999
    await nc.close()


async def replica(server: NatsServer, keys: dict[str, str], name: str) -> tuple[Api, NATS]:
    lines = [key_line("admin", "ops", keys["admin"]), key_line("infer", "app", keys["infer"])]
    settings = GatewaySettings(
        api_keys="\n".join(lines),
        log_json=False,
        nats_url=server.url,
        nats_user="gateway",
        nats_password_file=server.password_files["gateway"],
        instance_id=name,
        rollout_lease_ttl_s=1.0,
    )
    fleet = Fleet(ttl=3600)
    app = create_app(settings, fleet=fleet, bus=False)
    controller: RolloutController = app.api.state.rollouts
    controller.tick_s = 0.05
    controller.drain_s = 0.1
    nc = await nats.connect(server.url, user="gateway", password=server.users["gateway"])
    await controller.bind(nc.jetstream())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.api), base_url="http://gw")
    made = Api(app, http, fleet, controller, keys)
    for edge in ("edge-1", "edge-2"):
        made.beat(edge, [1])
    return made, nc


@pytest.fixture
async def replicas(nats_server: NatsServer) -> AsyncIterator[list[tuple[Api, NATS]]]:
    nc = await connect(nats_server)
    store = await nc.jetstream().create_object_store(MODELS_BUCKET)
    await store.put(model_object_name(MODEL, 2, "manifest.json"), b"{}")
    await nc.close()
    keys = {"admin": generate_key(), "infer": generate_key()}
    made = [await replica(nats_server, keys, name) for name in ("gw-a", "gw-b")]
    try:
        yield made
    finally:
        for api, bus in made:
            await api.controller.close()
            await api.http.aclose()
            await bus.close()


async def until(check: Any, what: str, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {what}")


def serve(api: Api, version: int, n: int) -> None:
    for _ in range(n):
        api.app.state.metrics.stats.observe(MODEL, str(version), "edge-1", 200, 0.001)


async def test_acting_replica_dies_mid_canary_and_another_finishes(
    replicas: list[tuple[Api, NATS]],
) -> None:
    (a, _), (b, bus_b) = replicas
    kv = await kv_bucket(bus_b.jetstream(), ROLLOUTS_BUCKET)
    actor = await until(lambda: lease_holder(kv), "a lease holder")
    acting, other = (a, b) if actor == "gw-a" else (b, a)
    url = f"/v1/models/{MODEL}/rollouts"
    spec = {"version": 2, "canary": 50, "window_s": 0.5, "min_requests": 30}
    r = (await other.call("POST", url, spec)).json()  # any replica takes commands
    for api in (a, b):
        api.beat("edge-1", [1, 2], r["id"])
        api.beat("edge-2", [1, 2], r["id"])

    async def state() -> str:
        return str((await other.call("GET", f"{url}/{r['id']}")).json()["state"])

    await until(lambda: _is(state, "canary"), "canary")

    async def both_split() -> bool:  # every replica routes the recorded split (next tick)
        splits = [api.app.state.router.splits.get(MODEL) for api in (a, b)]
        return all(s is not None and (s.candidate, s.candidate_weight) == (2, 0.5) for s in splits)

    await until(both_split, "the split applied by both replicas")
    serve(acting, 2, 12)
    serve(other, 2, 12)  # 24 in all: below min_requests=30 on the sum
    await asyncio.sleep(1.0)
    assert await state() == "canary"
    obs = (await other.call("GET", f"{url}/{r['id']}")).json()
    assert obs["state"] == "canary"
    # the acting replica dies (no clean release): its task ends, the lease is not renewed
    assert acting.controller._task is not None
    await acting.controller.stop_loop()  # without close()'s clean release of the lease
    started = time.monotonic()
    survivor = "gw-b" if actor == "gw-a" else "gw-a"
    await until(lambda: _eq(lease_holder(kv), survivor), "taken over", within=10)
    took_over_s = time.monotonic() - started
    serve(other, 2, 10)  # 34 on the sum, counted on two replicas (one of them dead now)
    await until(lambda: _is(state, "promoted"), "promoted", within=15)
    assert took_over_s < 5.0, took_over_s


async def _is(state: Any, want: str) -> bool:
    return bool(await state() == want)


async def _eq(value: Any, want: str) -> bool:
    return bool(await value == want)
