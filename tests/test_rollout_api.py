"""The rollout API and controller against a real nats-server (KV, object store); the fleet
is injected as heartbeats, so no Triton is needed here (test_rollout_stack has them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from fedcore.artifact_store import MODELS_BUCKET, model_object_name
from fedcore.wire import DESIRED_BUCKET, DesiredVersions, Heartbeat, ModelState
from gateway.app import GatewayApp, create_app
from gateway.auth import generate_key, key_line
from gateway.fleet import Fleet
from gateway.rollout_control import RolloutController
from gateway.settings import GatewaySettings
from tests.conftest import NatsServer

MODEL = "digits"


@dataclass
class Api:
    app: GatewayApp
    http: httpx.AsyncClient
    fleet: Fleet
    controller: RolloutController
    keys: dict[str, str]

    async def call(self, method: str, path: str, body: Any = None, key: str = "admin") -> Any:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return await self.http.request(method, path, json=body, headers=headers)

    def beat(self, edge: str, ready: list[int], rollout: str | None = None, **extra: Any) -> None:
        state = ModelState(ready=ready, rollout=rollout, **extra)
        self.fleet.observe(
            Heartbeat(edge_id=edge, url="http://127.0.0.1:9", seq=1, ts=0, models={MODEL: state})
        )


async def connect(server: NatsServer) -> NATS:
    return await nats.connect(server.url, user="gateway", password=server.users["gateway"])


async def make_api(server: NatsServer, keys: dict[str, str]) -> tuple[Api, NATS]:
    lines = [key_line("admin", "ops", keys["admin"]), key_line("infer", "app", keys["infer"])]
    settings = GatewaySettings(
        api_keys="\n".join(lines),
        log_json=False,
        nats_url=server.url,
        nats_user="gateway",
        nats_password_file=server.password_files["gateway"],
    )
    fleet = Fleet(ttl=3600)
    app = create_app(settings, fleet=fleet, bus=False)
    controller: RolloutController = app.api.state.rollouts
    controller.tick_s = 0.05
    controller.drain_s = 0.1
    nc = await connect(server)
    await controller.bind(nc.jetstream())
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.api), base_url="http://gw")
    return Api(app, http, fleet, controller, keys), nc


@pytest.fixture
async def api(nats_server: NatsServer) -> AsyncIterator[Api]:
    nc = await connect(nats_server)
    store = await nc.jetstream().create_object_store(MODELS_BUCKET)
    for version in (2, 3):  # the gateway checks that the version's manifest is in the store
        await store.put(model_object_name(MODEL, version, "manifest.json"), b"{}")
    await nc.close()
    keys = {"admin": generate_key(), "infer": generate_key()}
    made, bus = await make_api(nats_server, keys)
    made.beat("edge-1", [1])
    made.beat("edge-2", [1])
    try:
        yield made
    finally:
        await made.controller.close()
        await made.http.aclose()
        await bus.close()


async def wait_state(api: Api, rollout_id: str, state: str) -> Any:
    deadline = time.monotonic() + 10
    body: Any = None
    while time.monotonic() < deadline:
        body = (await api.call("GET", f"/v1/models/{MODEL}/rollouts/{rollout_id}")).json()
        if body["state"] == state:
            return body
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{rollout_id} never {state}: {body}")


async def test_admin_key_required(api: Api) -> None:
    body = {"version": 2}
    assert (await api.call("POST", f"/v1/models/{MODEL}/rollouts", body, key="")).status_code == 401
    refused = await api.call("POST", f"/v1/models/{MODEL}/rollouts", body, key="infer")
    assert refused.status_code == 403 and "needs 'admin'" in refused.json()["error"]
    assert (await api.call("GET", f"/v1/models/{MODEL}/rollouts", key="infer")).status_code == 403


async def test_bad_requests(api: Api) -> None:
    url = f"/v1/models/{MODEL}/rollouts"
    bad = await api.call("POST", url, {"version": 2, "canary": 150})
    assert bad.status_code == 400 and bad.json()["error"].startswith("rollout canary:")
    missing = await api.call("POST", url, {"version": 9})
    assert missing.status_code == 404 and "not in the model store" in missing.json()["error"]
    same = await api.call("POST", url, {"version": 1})
    assert same.status_code == 409 and "already the serving version" in same.json()["error"]
    assert (await api.call("GET", f"{url}/r-000000000000")).status_code == 404
    assert (await api.call("GET", f"{url}/nope")).status_code == 404
    assert (await api.call("POST", f"{url}/r-000000000000/promote")).status_code == 404


async def test_idempotent_start_and_one_winner(api: Api) -> None:
    url = f"/v1/models/{MODEL}/rollouts"
    spec = {"version": 2, "canary": 20}
    first, again, other = await asyncio.gather(
        api.call("POST", url, spec),
        api.call("POST", url, spec),
        api.call("POST", url, {"version": 3}),
    )
    statuses = sorted([first.status_code, again.status_code, other.status_code])
    assert statuses in ([200, 201, 409], [201, 409, 409]), statuses
    winner = next(r for r in (first, again, other) if r.status_code == 201).json()
    for r in (first, again, other):
        if r.status_code == 200:
            assert r.json()["id"] == winner["id"]
        if r.status_code == 409:
            assert winner["id"] in r.json()["error"]
    listed = (await api.call("GET", url)).json()
    assert [r["id"] for r in listed["rollouts"]] == [winner["id"]]


async def test_two_gateways_race_one_wins(api: Api, nats_server: NatsServer) -> None:
    other, bus = await make_api(nats_server, api.keys)
    other.beat("edge-1", [1])
    try:
        url = f"/v1/models/{MODEL}/rollouts"
        a, b = await asyncio.gather(
            api.call("POST", url, {"version": 2}), other.call("POST", url, {"version": 3})
        )
        assert sorted([a.status_code, b.status_code]) == [201, 409]
    finally:
        await other.controller.close()
        await other.http.aclose()
        await bus.close()


async def test_staging_canary_commands_and_restart(api: Api, nats_server: NatsServer) -> None:
    url = f"/v1/models/{MODEL}/rollouts"
    r = (await api.call("POST", url, {"version": 2, "canary": 25, "auto_promote": False})).json()
    staging = await wait_state(api, r["id"], "staging")
    assert staging["split"] == {"stable": 1, "candidate": None, "candidate_weight": 0.0}
    early = await api.call("POST", f"{url}/{r['id']}/promote")
    assert early.status_code == 409 and "only a canary" in early.json()["error"]
    # the desired versions are in KV for the edges
    nc = await connect(nats_server)
    entry = await (await nc.jetstream().key_value(DESIRED_BUCKET)).get(MODEL)
    desired = DesiredVersions.decode(entry.value or b"")
    assert desired.versions() == [1, 2] and desired.rollout == r["id"]
    # the edges report the candidate ready for this rollout: canary at 25 %
    api.beat("edge-1", [1, 2], r["id"])
    api.beat("edge-2", [1, 2], r["id"])
    canary = await wait_state(api, r["id"], "canary")
    assert canary["split"] == {"stable": 1, "candidate": 2, "candidate_weight": 0.25}
    assert canary["observation"]["candidate"]["requests"] == 0
    # a restarted gateway applies the recorded split before it serves
    fresh, bus = await make_api(nats_server, api.keys)
    assert fresh.app.state.router.splits[MODEL].candidate_weight == 0.25
    await fresh.controller.close()
    await fresh.http.aclose()
    await bus.close()
    # roll back by hand; again is a no-op, promote is refused
    back = await api.call("POST", f"{url}/{r['id']}/rollback")
    assert back.status_code == 200 and back.json()["state"] == "rolled_back"
    assert back.json()["reason"] == "rolled back by ops"
    assert back.json()["split"] == {"stable": 1, "candidate": None, "candidate_weight": 0.0}
    assert (await api.call("POST", f"{url}/{r['id']}/rollback")).json()["id"] == r["id"]
    assert (await api.call("POST", f"{url}/{r['id']}/promote")).status_code == 409
    # after the drain the edges are told to drop the candidate; settled once they have
    deadline = time.monotonic() + 5
    while desired.candidate is not None and time.monotonic() < deadline:
        entry = await (await nc.jetstream().key_value(DESIRED_BUCKET)).get(MODEL)
        desired = DesiredVersions.decode(entry.value or b"")
        await asyncio.sleep(0.05)
    assert desired.versions() == [1]
    await nc.close()
    api.beat("edge-1", [1], r["id"])
    api.beat("edge-2", [1], r["id"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        body = (await api.call("GET", f"{url}/{r['id']}")).json()
        if body["settled"]:
            break
        await asyncio.sleep(0.05)
    kinds = [e["kind"] for e in body["events"]]
    assert kinds == ["created", "staging", "canary", "rolled_back", "settled"]
    metrics = (await api.call("GET", "/metrics")).text
    assert 'fedgate_gateway_rollout_events_total{kind="rolled_back",model="digits"} 1.0' in metrics
    assert 'fedgate_gateway_rollout_state{model="digits",state="rolled_back"} 1.0' in metrics


async def test_refusals_fail_the_rollout_with_each_reason(api: Api) -> None:
    url = f"/v1/models/{MODEL}/rollouts"
    r = (await api.call("POST", url, {"version": 3})).json()
    await wait_state(api, r["id"], "staging")
    why = "refused: bad-signature: digits version 3: not signed by the trusted key"
    api.beat("edge-1", [1], r["id"], failed={3: why})
    await asyncio.sleep(0.3)  # edge-2 has not answered: still staging
    assert (await api.call("GET", f"{url}/{r['id']}")).json()["state"] == "staging"
    api.beat("edge-2", [1], r["id"], failed={3: why})
    failed = await wait_state(api, r["id"], "failed")
    assert failed["reason"] == f"edge-1: {why}; edge-2: {why}"
    # the model is free again: a new rollout may start
    again = await api.call("POST", url, {"version": 2})
    assert again.status_code == 201 and again.json()["stable"] == 1


async def test_operator_routing_holds_until_the_rollout_moves(api: Api) -> None:
    url = f"/v1/models/{MODEL}/rollouts"
    r = (await api.call("POST", url, {"version": 2, "auto_promote": False})).json()
    await wait_state(api, r["id"], "staging")
    manual = {"stable": 1, "candidate": 2, "candidate_weight": 0.5}
    assert (await api.call("PUT", f"/v1/models/{MODEL}/routing", manual)).status_code == 200
    await asyncio.sleep(0.3)  # several ticks
    routing = (await api.call("GET", f"/v1/models/{MODEL}/routing")).json()
    assert routing["split"] == manual
    api.beat("edge-1", [1, 2], r["id"])
    api.beat("edge-2", [1, 2], r["id"])
    canary = await wait_state(api, r["id"], "canary")
    assert canary["split"] == {"stable": 1, "candidate": 2, "candidate_weight": 0.1}


async def test_close_stops_a_loop_that_swallowed_its_cancellation(api: Api) -> None:
    """asyncio.wait_for in Python 3.11 can return a result that arrived with a cancel; a
    tick loop that lost its cancellation must still stop on close (this hung a CI run)."""
    controller = api.controller
    await controller.close()
    controller._closing = False
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while not controller._closing:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                swallowed += 1  # lost, as in the race

    controller._task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(controller.close(), 5)
    assert swallowed >= 1 and controller._task is None


async def test_a_bus_that_does_not_answer_is_a_503_not_a_500(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NATS node failing over timed the rollout read out and the API answered 500."""
    store = api.controller.store
    assert store is not None

    async def timed_out(*_: Any) -> Any:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(store, "history", timed_out)
    monkeypatch.setattr(store, "current", timed_out)
    resp = await api.call("GET", f"/v1/models/{MODEL}/rollouts")
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "1"
    assert "NATS bus did not answer" in resp.json()["error"]
