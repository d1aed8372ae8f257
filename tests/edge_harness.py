"""One real edge (tritonserver + runtime), the gateway and a trainer-side ingestor, in process.

For the learning-loop tests: everything is real (nats-server, tritonserver, uvicorn, the
fine-tuning worker process); only the trainer's aggregation is a plain sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import uvicorn
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from edge_runtime.service import EdgeRuntime
from edge_runtime.settings import EdgeSettings
from fedcore.artifact import MANIFEST
from fedcore.compression import sizes_from_layout
from fedcore.enrollment import load_registry
from fedcore.keys import load_x25519, write_public, write_secret
from fedcore.models import get_spec
from fedcore.params import layout
from fedcore.process import free_port
from fedcore.transport import StreamSpec
from fedcore.wire import ROUNDS_BUCKET, RoundAnnouncement
from fedgate.keys_cmd import init_keys
from gateway.app import create_app
from gateway.feedback_token import HEADER as TOKEN_HEADER
from gateway.settings import GatewaySettings
from tests.conftest import NatsServer, SignedArtifacts
from trainer.bus import ensure_transport
from trainer.ingest import AcceptedUpdate, IngestOptions, UpdateIngestor
from trainer.ingest_metrics import IngestMetrics
from trainer.ledger import UpdateLedger
from trainer.opener import RoundTarget
from trainer.registry import RegistryFile, mirror_registry

MODEL = "digits"


def v1_digest(signed: SignedArtifacts) -> str:
    body = json.loads((signed.artifacts / MODEL / "1" / MANIFEST).read_text())
    return str(body["manifest"]["files"]["model.onnx"])


def announcement(round_no: int, base_version: int, digest: str) -> RoundAnnouncement:
    now = time.time()
    return RoundAnnouncement(
        model=MODEL,
        round=round_no,
        mode="sync",
        base_version=base_version,
        base_digest=digest,
        opened_ts=now,
        deadline_ts=now + 600,
    )


@dataclass
class Folded:
    updates: list[AcceptedUpdate] = field(default_factory=list)

    def fold(self, update: AcceptedUpdate) -> None:
        self.updates.append(update)


@dataclass
class Rounds:
    current: RoundTarget | None = None

    def target(self, model: str) -> RoundTarget | None:
        return self.current if self.current and self.current.model == model else None


@dataclass
class Sniffer:
    """Every message published on the NATS server, as seen by a ``>`` subscriber."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)

    async def on_msg(self, msg: Msg) -> None:
        self.messages.append((msg.subject, bytes(msg.data)))


@dataclass
class Stack:
    runtime: EdgeRuntime
    trainer_nc: NATS
    ingestor: UpdateIngestor
    folded: Folded
    rounds: Rounds
    sniffer: Sniffer
    gateway_url: str
    http: httpx.AsyncClient
    digest: str
    tokens: dict[str, str] = field(default_factory=dict)  # request id -> feedback token

    async def announce(self, a: RoundAnnouncement) -> None:
        kv = await self.trainer_nc.jetstream().key_value(ROUNDS_BUCKET)
        await kv.put(MODEL, a.encode())
        sizes = tuple(sizes_from_layout(layout(get_spec(MODEL).build_module())))
        self.rounds.current = RoundTarget(MODEL, a.round, a.base_version, a.base_digest, sizes)

    async def infer(self, x: NDArray[Any], request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}]
        }
        if request_id is not None:
            body["id"] = request_id
        resp = await self.http.post(f"{self.gateway_url}/v2/models/{MODEL}/infer", json=body)
        assert resp.status_code == 200, resp.text
        if request_id is not None and TOKEN_HEADER in resp.headers:
            self.tokens[request_id] = resp.headers[TOKEN_HEADER]
        out: dict[str, Any] = resp.json()
        return out

    async def feedback(self, body: dict[str, Any]) -> httpx.Response:
        """Post a label, with the feedback token of its request when there was one."""
        token = self.tokens.get(str(body.get("id")))
        headers = {TOKEN_HEADER: token} if token else None
        return await self.http.post(f"{self.gateway_url}/v1/feedback", json=body, headers=headers)


def edge_settings(
    root: Path, server: NatsServer, signed: SignedArtifacts, **overrides: Any
) -> EdgeSettings:
    keys = init_keys(root / "keys", ["edge-1"])
    trainer_pub = root / "trainer-signing.pub"
    write_public(trainer_pub, signed.public_hex)
    secret = root / "triton-control.secret"
    write_secret(secret, "edge-control-secret")
    values: dict[str, Any] = {
        "edge_id": "edge-1",
        "data_dir": root / "edge",
        "seed_artifacts_dir": signed.artifacts,
        "trainer_public_key_file": trainer_pub,
        "identity_key_file": keys.edge_key("edge-1"),
        "trainer_hpke_public_key_file": keys.hpke_pub,
        "triton_control_secret_file": secret,
        "triton_http_port": free_port(),
        "triton_grpc_port": free_port(),
        "triton_metrics_port": free_port(),
        "instance_kind": "KIND_CPU",
        "nats_url": server.url,
        "nats_user": "edge-1",
        "nats_password_file": server.password_files["edge-1"],
        "exit_timeout_s": 2,
        "heartbeat_interval_s": 0.5,
        "log_json": False,
    }
    values.update(overrides)
    return EdgeSettings(**values)


async def _trainer_side(
    server: NatsServer, registry: Path, hpke_key: Path
) -> tuple[NATS, UpdateIngestor, Folded, Rounds]:
    nc = await nats.connect(server.url, user="trainer", password=server.users["trainer"])
    js = nc.jetstream()
    await mirror_registry(js, load_registry(registry))  # the gateway routes enrolled edges only
    await ensure_transport(js, StreamSpec(max_msg_size=nc.max_payload))
    await js.create_key_value(bucket=ROUNDS_BUCKET)
    folded, rounds = Folded(), Rounds()
    ingestor = UpdateIngestor(
        js,
        recipient=load_x25519(hpke_key),
        edges=RegistryFile(registry),
        rounds=rounds,
        aggregator=folded,
        ledger=await UpdateLedger.open(js),
        metrics=IngestMetrics(CollectorRegistry()),
        options=IngestOptions(ack_wait_s=5.0, fetch_timeout_s=0.5),
    )
    await ingestor.bind()
    return nc, ingestor, folded, rounds


async def _gateway(
    server: NatsServer, **overrides: Any
) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    port = free_port()
    settings = GatewaySettings(
        port=port,
        dev_mode=not overrides.get("api_keys"),
        nats_url=server.url,
        nats_user="gateway",
        nats_password_file=server.password_files["gateway"],
        log_json=False,
        **overrides,
    )
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    gateway = uvicorn.Server(config)
    task = asyncio.create_task(gateway.serve())
    while not gateway.started:
        assert not task.done(), "the gateway did not start"
        await asyncio.sleep(0.05)
    return gateway, task, f"http://127.0.0.1:{port}"


async def wait_until_routed(stack: Stack, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = await stack.http.get(f"{stack.gateway_url}/v1/edges")
        if resp.status_code == 200 and resp.json()["edges"]:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the gateway never saw the edge")


@contextlib.asynccontextmanager
async def running_stack(
    root: Path,
    server: NatsServer,
    signed: SignedArtifacts,
    gateway: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """Edge (Triton + runtime), gateway and a trainer-side ingestor; all stopped after.

    ``gateway``: settings of the gateway (dev mode without ``api_keys``); ``headers``: sent
    with every request of ``Stack.http`` (e.g. an admin key's authorization)."""
    settings = edge_settings(root, server, signed, **overrides)
    keys = init_keys(root / "keys", ["edge-1"])
    sniffer = Sniffer()
    trainer_nc, ingestor, folded, rounds = await _trainer_side(server, keys.registry, keys.hpke_key)
    sniff_sub = await trainer_nc.subscribe(">", cb=sniffer.on_msg)
    runtime = EdgeRuntime(settings)
    runtime.start_triton()  # main thread: the death signal follows the forking thread
    secret = root / "secrets" / "gateway-feedback"
    write_secret(secret, "feedback-token-secret-" + os.urandom(8).hex())
    gateway = {"feedback_secret_file": secret, **(gateway or {})}
    gateway_server, gateway_task, url = await _gateway(server, **gateway)
    edge_task = asyncio.create_task(runtime.run())
    http = httpx.AsyncClient(timeout=30, headers=headers)
    stack = Stack(
        runtime, trainer_nc, ingestor, folded, rounds, sniffer, url, http, v1_digest(signed)
    )
    try:
        await wait_until_routed(stack)
        yield stack
    finally:
        await http.aclose()
        runtime.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(edge_task, 15)
        await runtime.shutdown()
        gateway_server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gateway_task, 10)
        await sniff_sub.unsubscribe()
        await trainer_nc.close()


def raw_fragments(rows: NDArray[Any], width: int = 16) -> set[bytes]:
    """Aligned ``width``-byte pieces of each row that are not mostly zero: any of them in
    a NATS message would mean raw input bytes left the edge."""
    out: set[bytes] = set()
    for row in rows.astype("<f4"):
        raw = row.tobytes()
        for at in range(0, len(raw) - width + 1, width):
            piece = raw[at : at + width]
            if sum(b != 0 for b in piece) >= width // 2:
                out.add(piece)
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
