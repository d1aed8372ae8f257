"""``fedgate up --nats-cluster 3 --gateways 2`` (#17 items 1 and 2), as processes: three
nats-servers with routes, two gateway replicas, two edges with real tritonservers.

Every stream, bucket and object store has 3 replicas. A rollout started through one gateway
is in its canary when the acting gateway (the holder of the rollout lease) and one
nats-server are SIGKILLed together: the other gateway takes the lease over, the rollout is
promoted on the counts of both replicas, every edge serves the new version, and the
surviving gateway's clients saw (almost) no failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import nats
import numpy as np
import pytest

from fedcore.artifact_store import upload_version
from fedcore.keys import load_ed25519
from fedcore.kv import kv_bucket
from fedcore.models import get_spec
from fedcore.process import free_port
from fedcore.subjects import inbox_prefix
from fedcore.wire import ROLLOUTS_BUCKET
from fedgate.launcher import Stack, StackConfig
from gateway.rollout_lease import lease_holder
from tests.conftest import processes_mentioning
from tests.rollout_harness import MODEL, Load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("cluster")
    config = StackConfig(
        data_dir=root,
        edges=2,
        port=free_pair(),
        nats_cluster=3,
        gateways=2,
        overrides={"FEDGATE_GATEWAY_": {"RATE_LIMIT_PER_S": "0", "ROLLOUT_LEASE_TTL_S": "1.5"}},
    )
    running = Stack(config)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        assert processes_mentioning(str(root)) == []


def free_pair() -> int:
    """A free port whose successor is free too (the second gateway's)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def streams(stack: Stack) -> dict[str, int]:
    conf = (stack.config.data_dir / "nats" / "nats.conf").read_text()
    monitor = next(line.split()[1] for line in conf.splitlines() if line.startswith("http:"))
    url = f"http://{monitor}/jsz?accounts=true&streams=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    return {
        s["name"]: s["config"]["num_replicas"]
        for a in body.get("account_details", [])
        for s in a.get("stream_detail", [])
    }


def test_every_stream_and_bucket_has_three_replicas(stack: Stack) -> None:
    found = streams(stack)
    expected = {"FEDGATE_UPDATES", "KV_fedgate_rounds", "KV_fedgate_rollouts", "OBJ_fedgate_models"}
    missing = {name for name in expected if name not in found}
    assert not missing, found
    assert all(replicas == 3 for replicas in found.values()), found


def call(url: str, key: str, method: str, path: str, body: Any = None) -> Any:
    """One JSON request; a 503 (the bus failing over) is retried for up to 20 s."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    deadline = time.monotonic() + 20
    while True:
        req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


async def publish_v2(stack: Stack) -> None:
    """Version 2 (version 1 nudged), signed with the stack's trainer key, in the store."""
    root = stack.config.data_dir
    from trainer.bootstrap import write_version

    v1 = np.load(root / "trainer" / "state" / f"{MODEL}-1.npy", allow_pickle=False)
    v2 = v1 + np.random.default_rng(3).normal(0, 1e-3, v1.shape).astype(np.float32)
    directory = root / "v2" / MODEL / "2"
    key = load_ed25519(root / "keys" / "trainer-signing.key")
    write_version(get_spec(MODEL), v2, directory, key, version=2, parent_version=1)
    password = (root / "secrets" / "nats-trainer.pass").read_text().strip()
    nc = await nats.connect(
        stack.nats_url.split(","),
        user="trainer",
        password=password,
        inbox_prefix=inbox_prefix("trainer"),
    )
    try:
        await upload_version(nc.jetstream(), MODEL, 2, directory, replicas=3)
    finally:
        await nc.close()


async def acting_gateway(stack: Stack) -> str:
    password = (stack.config.data_dir / "secrets" / "nats-gateway.pass").read_text().strip()
    nc = await nats.connect(
        stack.nats_url.split(","),
        user="gateway",
        password=password,
        inbox_prefix=inbox_prefix("gateway"),
    )
    try:
        kv = await kv_bucket(nc.jetstream(), ROLLOUTS_BUCKET, 3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            holder = await lease_holder(kv)
            if holder is not None:
                return holder
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    raise AssertionError("no gateway holds the rollout lease")


def kill(stack: Stack, name: str) -> None:
    proc = next(p for p in stack.processes if p.name == name)
    assert proc.pid is not None
    os.killpg(proc.pid, signal.SIGKILL)


async def test_acting_gateway_and_a_nats_node_die_mid_canary(stack: Stack) -> None:
    await publish_v2(stack)
    holder = await acting_gateway(stack)  # "gateway-1" or "gateway-2"
    index = int(holder.rsplit("-", 1)[1]) - 1
    acting_url, survivor_url = stack.gateway_urls[index], stack.gateway_urls[1 - index]
    admin, infer = stack.api_key("admin"), stack.api_key("infer")
    path = f"/v1/models/{MODEL}/rollouts"
    spec = {"version": 2, "canary": 50, "window_s": 3.0, "min_requests": 40}
    async with Load(acting_url, infer, clients=2), Load(survivor_url, infer, clients=2) as load:
        r = await asyncio.to_thread(call, survivor_url, admin, "POST", path, spec)
        deadline = time.monotonic() + 90
        state = r["state"]
        while state != "canary" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            state = (
                await asyncio.to_thread(call, survivor_url, admin, "GET", f"{path}/{r['id']}")
            )["state"]
        assert state == "canary", state
        load.phase = "fault"
        kill(stack, "gateway" if index == 0 else "gateway-2")
        kill(stack, "nats-server-3")
        killed_at = time.monotonic()
        while time.monotonic() < killed_at + 90:
            body = await asyncio.to_thread(call, survivor_url, admin, "GET", f"{path}/{r['id']}")
            if body["state"] != "canary":
                break
            await asyncio.sleep(0.3)
        assert body["state"] == "promoted", body
        took_s = time.monotonic() - killed_at
    served = sum(load.versions("fault").values())
    failed = load.failed("fault")
    assert served > 0 and len(failed) <= max(2, 0.01 * served), failed[:5]
    assert took_s < 60, took_s
    edges = await asyncio.to_thread(call, survivor_url, infer, "GET", "/v1/edges")
    assert all(2 in e["models"][MODEL]["ready"] for e in edges["edges"]), edges
