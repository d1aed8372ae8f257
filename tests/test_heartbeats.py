"""Heartbeats are bound to their subject and accepted only from enrolled edges, by the
gateway and by the trainer (issue #16, finding 3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from fedcore import subjects
from fedcore.enrollment import EdgeRegistry, load_registry
from fedcore.heartbeats import HeartbeatRefused, accept_heartbeat, subject_edge
from fedcore.subjects import inbox_prefix
from fedcore.wire import Heartbeat, ModelState
from fedgate.keys_cmd import KeyLayout, init_keys, revoke_edge
from fedgate.launcher import Stack, StackConfig
from gateway.app import GatewayApp, create_app
from gateway.settings import GatewaySettings
from tests.conftest import processes_mentioning
from trainer.registry import RegistryFile, keep_mirrored
from trainer.roster import Roster

EDGES = ["edge-1", "edge-2"]
URLS = {"edge-1": "http://10.9.0.1:8000", "edge-2": "http://10.9.0.2:8000"}


def beat(edge_id: str, url: str, seq: int = 1) -> bytes:
    return Heartbeat(
        edge_id=edge_id, url=url, seq=seq, ts=time.time(), models={"digits": ModelState(ready=[1])}
    ).encode()


def test_a_heartbeat_must_name_its_subject_and_an_enrolled_edge() -> None:
    enrolled = {"edge-1", "edge-2"}.__contains__
    ok = accept_heartbeat(subjects.heartbeat("edge-1"), beat("edge-1", URLS["edge-1"]), enrolled)
    assert ok.edge_id == "edge-1"
    cases = [
        (subjects.heartbeat("edge-2"), beat("edge-1", URLS["edge-2"]), "subject-mismatch"),
        ("fedgate.fleet.heartbeat.edge-2.x", beat("edge-2", URLS["edge-2"]), "subject-mismatch"),
        (subjects.heartbeat("edge-9"), beat("edge-9", URLS["edge-2"]), "not-enrolled"),
        (subjects.heartbeat("edge-1"), b'{"edge_id": "edge-1"}', "malformed"),
    ]
    for subject, data, reason in cases:
        with pytest.raises(HeartbeatRefused) as err:
            accept_heartbeat(subject, data, enrolled)
        assert err.value.reason == reason, subject
    assert subject_edge("fedgate.fleet.heartbeat.edge-3") == "edge-3"
    assert subject_edge("fedgate.fleet.leave.edge-3") is None


class Registry:
    def __init__(self, edges: list[str]) -> None:
        self.registry = EdgeRegistry()
        for i, edge in enumerate(edges):
            self.registry = self.registry.enroll(edge, f"{i + 1:02x}" * 32)

    def current(self) -> EdgeRegistry:
        return self.registry


def refused(registry: CollectorRegistry, reason: str, service: str = "trainer") -> float:
    name = f"fedgate_{service}_heartbeats_refused_total"
    return registry.get_sample_value(name, {"reason": reason}) or 0.0


def test_the_trainer_forgets_silent_edges_and_never_invites_phantoms() -> None:
    """Its fleet grew forever and took any edge id a payload named (an edge could invite
    phantoms into rounds); the TTL was a fixed 5 s whatever the edges' interval."""
    now = [0.0]
    metrics = CollectorRegistry()
    roster = Roster(
        Registry(["edge-1", "edge-2"]), ttl_s=2.0, registry=metrics, clock=lambda: now[0]
    )
    assert roster.observe(subjects.heartbeat("edge-1"), beat("edge-1", URLS["edge-1"]))
    assert roster.observe(subjects.heartbeat("edge-2"), beat("edge-2", URLS["edge-2"]))
    assert not roster.observe(subjects.heartbeat("edge-2"), beat("edge-9", URLS["edge-2"]))
    assert not roster.observe(subjects.heartbeat("edge-9"), beat("edge-9", URLS["edge-2"]))
    assert roster.alive() == ["edge-1", "edge-2"]
    assert refused(metrics, "subject-mismatch") == 1 and refused(metrics, "not-enrolled") == 1
    now[0] = 1.5
    roster.observe(subjects.heartbeat("edge-1"), beat("edge-1", URLS["edge-1"]))
    now[0] = 2.5
    assert roster.alive() == ["edge-1"] and set(roster.seen) == {"edge-1"}  # edge-2 forgotten
    now[0] = 10.0
    assert roster.alive() == [] and roster.seen == {}


# -- against a real nats-server with the deployment's permissions ------------------------


@dataclass
class Deployment:
    stack: Stack
    keys: KeyLayout

    def password(self, user: str) -> str:
        return (self.stack.config.data_dir / "secrets" / f"nats-{user}.pass").read_text().strip()

    async def connect(self, user: str) -> NATS:
        return await nats.connect(
            self.stack.nats_url,
            user=user,
            password=self.password(user),
            connect_timeout=3,
            inbox_prefix=inbox_prefix(user),
        )


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    stack = Stack(StackConfig(data_dir=tmp_path / "stack", edges=len(EDGES)))
    try:
        stack._start_nats()  # exactly as `fedgate up` starts it: per-role permissions
        yield Deployment(stack, init_keys(tmp_path / "stack" / "keys", EDGES))
    finally:
        stack.stop()
    assert processes_mentioning(str(tmp_path / "stack")) == []


@pytest.fixture
async def gateway(deployment: Deployment) -> AsyncIterator[GatewayApp]:
    settings = GatewaySettings(
        nats_url=deployment.stack.nats_url,
        nats_user="gateway",
        nats_password_file=deployment.stack.config.data_dir / "secrets" / "nats-gateway.pass",
        dev_mode=True,
        log_json=False,
    )
    app = create_app(settings)
    async with app.api.router.lifespan_context(app.api):
        yield app


async def until(check: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_an_edge_cannot_take_another_edges_traffic_or_invite_phantoms(
    deployment: Deployment, gateway: GatewayApp
) -> None:
    """The attack of finding 3: edge-2, publishing only on its own subject (all NATS lets
    it), claims edge-1 with its own URL. On the old code requests for edge-1's site
    (``x-fedgate-prefer-edge: edge-1``) went to edge-2's server, and a payload naming
    ``edge-9`` put a phantom into the trainer's rounds."""
    state = gateway.state
    trainer_nc = await deployment.connect("trainer")
    edge_nc = {e: await deployment.connect(e) for e in EDGES}
    stop = asyncio.Event()
    registry = RegistryFile(deployment.keys.registry)
    metrics = CollectorRegistry()
    roster = Roster(registry, ttl_s=5.0, registry=metrics)
    await trainer_nc.subscribe(subjects.HEARTBEAT_ALL, cb=roster.on_heartbeat)
    await trainer_nc.flush()
    mirror = asyncio.create_task(
        keep_mirrored(trainer_nc.jetstream(), registry, stop, interval_s=0.2)
    )

    async def honest(seq: int) -> None:
        for e in EDGES:
            await edge_nc[e].publish(subjects.heartbeat(e), beat(e, URLS[e], seq))
            await edge_nc[e].flush()

    try:
        deadline = time.monotonic() + 10  # the gateway reads the registry mirror first
        while set(state.fleet.edges) != set(EDGES):
            assert time.monotonic() < deadline, "the gateway never took the honest heartbeats"
            await honest(1)
            await asyncio.sleep(0.1)
        for seq in range(2, 12):
            forged = beat("edge-1", URLS["edge-2"], seq)  # edge-2's own subject, edge-1's name
            await edge_nc["edge-2"].publish(subjects.heartbeat("edge-2"), forged)
            await edge_nc["edge-2"].publish(
                subjects.heartbeat("edge-2"), beat("edge-9", URLS["edge-2"], seq)
            )
            await edge_nc["edge-2"].flush()
            await asyncio.sleep(0.05)
            chosen, _ = state.router.route("digits", None, prefer="edge-1")
            assert (chosen.edge_id, chosen.url) == ("edge-1", URLS["edge-1"])
        await until(lambda: refused(state.metrics.registry, "subject-mismatch", "gateway") >= 20)
        assert set(state.fleet.edges) == {"edge-1", "edge-2"}
        assert state.fleet.edges["edge-1"].url == URLS["edge-1"]
        await until(lambda: refused(metrics, "subject-mismatch") >= 20)
        assert roster.alive() == ["edge-1", "edge-2"]  # no edge-9 to invite

        # a revoked edge leaves the gateway's fleet and the trainer's invitations at once
        revoke_edge(deployment.keys, "edge-2")
        assert load_registry(deployment.keys.registry)["edge-2"].revoked
        await until(lambda: "edge-2" not in state.fleet.edges)
        await honest(20)
        await until(lambda: refused(state.metrics.registry, "not-enrolled", "gateway") >= 1)
        assert "edge-2" not in state.fleet.edges and roster.alive() == ["edge-1"]
    finally:
        stop.set()
        await mirror
        for nc in [trainer_nc, *edge_nc.values()]:
            await nc.close()
