"""The rollout integration stack: real nats-server, edge runtimes with their own real
tritonservers, and the gateway, each its own process; the test plays the trainer (signed
versions into the object store) and the clients (continuous concurrent load with ids and
feedback labels).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import numpy as np

from fedcore.artifact_store import upload_version
from fedcore.keys import load_ed25519, write_public, write_secret
from fedcore.models import get_spec
from fedcore.process import ManagedProcess, free_port
from fedgate.keys_cmd import init_keys
from tests.conftest import NatsServer, SignedArtifacts, enroll_edges, start_nats, unseal
from tests.gateway_harness import _write_keys, start_gateway

MODEL = "digits"


def write_signed(
    root: Path, signed: SignedArtifacts, version: int, params: np.ndarray[Any, Any]
) -> Path:
    """``root/digits/<version>/`` signed with the trainer key of ``signed``."""
    from trainer.bootstrap import write_version

    directory = root / MODEL / str(version)
    key = load_ed25519(signed.private_key)
    write_version(get_spec(MODEL), params.astype("float32"), directory, key, version=version)
    unseal(directory)  # its callers tamper with some
    return directory


@dataclass
class Edge:
    edge_id: str
    process: ManagedProcess
    triton_port: int
    data_dir: Path


@dataclass
class RolloutStack:
    root: Path
    nats: NatsServer
    edges: dict[str, Edge]
    keys: dict[str, str]
    keys_file: Path
    port: int
    gateway: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- processes ---------------------------------------------------------------------
    def start_gateway(self) -> None:
        # no per-key rate limit: the load (and its feedback) runs as fast as the machine can
        self.gateway = start_gateway(
            self.root, self.nats, self.keys_file, PORT=str(self.port), RATE_LIMIT_PER_S="0"
        )
        self.gateway.wait_ready(self._gateway_live, 30)

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop(timeout=15)
            self.gateway = None

    def _gateway_live(self) -> bool:
        with urllib.request.urlopen(self.url + "/v2/health/live", timeout=2) as resp:
            return int(resp.status) == 200

    def stop(self) -> None:
        self.stop_gateway()
        for edge in self.edges.values():
            edge.process.stop(timeout=30)
        self.nats.process.stop()

    # -- the trainer's side ------------------------------------------------------------
    async def upload(self, directory: Path, version: int) -> None:
        nc = await nats.connect(self.nats.url, user="trainer", password=self.nats.users["trainer"])
        try:
            await upload_version(nc.jetstream(), MODEL, version, directory)
        finally:
            await nc.close()

    # -- the API -------------------------------------------------------------------------
    def call(self, method: str, path: str, body: Any = None, key: str = "admin") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/v1/models/{MODEL}/rollouts/{rollout_id}")
        assert status == 200, body
        return dict(body)

    def wait_rollout(
        self, rollout_id: str, states: set[str], timeout: float = 60, settled: bool = False
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.rollout(rollout_id)
            except (OSError, AssertionError):
                time.sleep(0.2)
                continue
            if last["state"] in states and (last["settled"] or not settled):
                return last
            if (
                last["state"] not in {"pending", "staging", "canary"}
                and last["state"] not in states
            ):
                raise AssertionError(f"rollout ended {last['state']}: {last['reason']}")
            time.sleep(0.1)
        raise TimeoutError(f"rollout {rollout_id} not {states} in {timeout} s: {last}")

    def edges_view(self) -> dict[str, dict[str, Any]]:
        status, body = self.call("GET", "/v1/edges", key="infer")
        assert status == 200, body
        return {e["edge_id"]: e["models"][MODEL] for e in body["edges"]}

    def wait_edges(self, check: Any, timeout: float = 30) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        view: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            view = self.edges_view()
            if len(view) == len(self.edges) and all(check(s) for s in view.values()):
                return view
            time.sleep(0.1)
        raise TimeoutError(f"edges never matched: {view}")


def _edge_env(
    root: Path, server: NatsServer, signed: SignedArtifacts, edge_id: str
) -> dict[str, Any]:
    keys = init_keys(root / "keys", [edge_id])
    trainer_pub = root / "trainer-signing.pub"
    write_public(trainer_pub, signed.public_hex)
    secret = root / "secrets" / f"triton-{edge_id}"
    write_secret(secret, f"control-{edge_id}")
    return {
        "EDGE_ID": edge_id,
        "DATA_DIR": str(root / edge_id),
        "SEED_ARTIFACTS_DIR": str(signed.artifacts),
        "TRAINER_PUBLIC_KEY_FILE": str(trainer_pub),
        "IDENTITY_KEY_FILE": str(keys.edge_key(edge_id)),
        "TRAINER_HPKE_PUBLIC_KEY_FILE": str(keys.hpke_pub),
        "TRITON_CONTROL_SECRET_FILE": str(secret),
        "TRITON_GRPC_PORT": str(free_port()),
        "TRITON_METRICS_PORT": str(free_port()),
        "INSTANCE_KIND": "KIND_CPU",
        "NATS_URL": server.url,
        "NATS_USER": edge_id,
        "NATS_PASSWORD_FILE": str(server.password_files[edge_id]),
        "EXIT_TIMEOUT_S": "3",
        "HEARTBEAT_INTERVAL_S": "0.5",
        "CAPTURE_RATE": "1.0",
        "LEARNING_ENABLED": "false",
        "LOG_JSON": "false",
    }


def _start_edge(root: Path, server: NatsServer, signed: SignedArtifacts, edge_id: str) -> Edge:
    port = free_port()
    values = _edge_env(root, server, signed, edge_id) | {"TRITON_HTTP_PORT": str(port)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    env.update({f"FEDGATE_EDGE_{k}": str(v) for k, v in values.items()})
    proc = ManagedProcess(
        edge_id,
        [sys.executable, "-m", "edge_runtime"],
        log_path=root / "logs" / f"{edge_id}.log",
        env=env,
    )
    proc.start()
    return Edge(edge_id, proc, port, root / edge_id)


def _triton_ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as resp:
        return int(resp.status) == 200


def start_stack(root: Path, signed: SignedArtifacts, edge_ids: list[str]) -> RolloutStack:
    """nats-server, the edges (serving version 1) and the gateway, all ready and routed."""
    server = start_nats(root / "nats", ["trainer", "gateway", *edge_ids])
    enroll_edges(server, edge_ids, "trainer")  # the gateway routes to enrolled edges only
    keys, keys_file = _write_keys(root)
    stack = RolloutStack(root, server, {}, keys, keys_file, free_port())
    try:
        for edge_id in edge_ids:
            stack.edges[edge_id] = _start_edge(root, server, signed, edge_id)
        stack.start_gateway()
        for edge in stack.edges.values():
            edge.process.wait_ready(functools.partial(_triton_ready, edge.triton_port), 120)
        stack.wait_edges(lambda s: s["ready"] == [1], timeout=60)
        return stack
    except BaseException:
        stack.stop()
        raise


# -- clients -------------------------------------------------------------------------------
@dataclass
class Load:
    """Clients sending single-row digits requests (with ids) in a loop; a share of the
    answered ones gets its true label as feedback. Counts everything by phase."""

    url: str
    key: str
    clients: int = 4
    label_share: float = 0.0
    phase: str = "start"
    ok: Counter[tuple[str, str]] = field(default_factory=Counter)  # (phase, version)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (phase, what)
    feedback: Counter[int] = field(default_factory=Counter)  # HTTP status
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _labels: asyncio.Queue[tuple[str, int]] = field(default_factory=asyncio.Queue)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=aiohttp.ClientTimeout(total=30),
        )
        _, _, x, y = get_spec(MODEL).dataset()
        self._x, self._y = x.astype("float32"), y
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        self._tasks += [asyncio.create_task(self._labeller()) for _ in range(2)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    def versions(self, phase: str) -> dict[str, int]:
        return {v: n for (p, v), n in self.ok.items() if p == phase}

    def failed(self, phase: str) -> list[str]:
        return [what for p, what in self.failures if p == phase]

    async def _client(self, index: int) -> None:
        rng = np.random.default_rng(index)
        n = 0
        while not self._stop.is_set():
            row = int(rng.integers(len(self._y)))
            n += 1
            request_id = f"c{index}-{n}"
            body = {
                "id": request_id,
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "data": self._x[row].tolist(),
                    }
                ],
            }
            phase = self.phase
            try:
                async with self._session.post(
                    f"{self.url}/v2/models/{MODEL}/infer", json=body
                ) as resp:
                    text = await resp.read()
                    if resp.status != 200:
                        self.failures.append((phase, f"{resp.status}: {text[:200]!r}"))
                        continue
                    self.ok[(phase, resp.headers["x-fedgate-model-version"])] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append((phase, repr(exc)))
                await asyncio.sleep(0.1)
                continue
            if self.label_share and rng.random() < self.label_share:
                self._labels.put_nowait((request_id, int(self._y[row])))

    async def _labeller(self) -> None:
        while not self._stop.is_set():
            try:
                request_id, label = await asyncio.wait_for(self._labels.get(), 0.2)
            except TimeoutError:
                continue
            body = {"model": MODEL, "id": request_id, "label": label}
            try:
                async with self._session.post(f"{self.url}/v1/feedback", json=body) as resp:
                    await resp.read()
                    self.feedback[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                self.feedback[0] += 1
