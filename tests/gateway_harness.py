"""A gateway in front of real tritonservers, for the gateway's integration tests.

Real processes: ``nats-server``, one ``tritonserver`` per edge serving a signed version,
and ``python -m gateway`` (uvicorn with the fast path) with API keys. The edges' fleet
heartbeats are published by a :class:`Heartbeats` thread on the real bus, in the wire
format the edge runtime uses; ``test_stack`` covers the edge runtime's own heartbeats.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats

from edge_runtime.repository import prepare_model
from edge_runtime.triton import TritonServer
from fedcore import subjects
from fedcore.errors import ProcessError
from fedcore.keys import ed25519_public_from_hex, load_ed25519, write_secret
from fedcore.models import get_spec
from fedcore.process import ManagedProcess, free_port
from fedcore.wire import Heartbeat, ModelState
from gateway.auth import generate_key, key_line
from tests.conftest import NatsServer, SignedArtifacts, enroll_edges, start_nats

T = TypeVar("T")


def signed_version(root: Path, signed: SignedArtifacts, version: int, scale: float) -> Path:
    """A seed directory holding only ``digits/<version>`` (weights scaled), signed."""
    from trainer.bootstrap import write_version

    seed = root / f"seed-v{version}"
    if not (seed / "digits" / str(version)).exists():
        key = load_ed25519(signed.private_key)
        params = (signed.params * scale).astype("float32")
        write_version(
            get_spec("digits"), params, seed / "digits" / str(version), key, version=version
        )
    return seed


def start_triton(root: Path, seed: Path, signed: SignedArtifacts) -> TritonServer:
    repo = root / "repo"
    trusted = ed25519_public_from_hex(signed.public_hex)
    prepare_model(repo, seed, "digits", "KIND_CPU", trusted)
    server = TritonServer(
        name=f"tritonserver[{root.parent.name}]",
        repository=repo,
        work_dir=root / "triton",
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        control_secret="test-control-secret",
        exit_timeout_s=5,
    )
    server.process.start()
    return server


def started(start: Callable[[], T], attempts: int = 3) -> T:
    """``start()``, again with fresh ports if another process took one meanwhile."""
    for attempt in range(attempts):
        try:
            return start()
        except ProcessError as exc:
            if exc.reason != "port-in-use" or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@dataclass
class Heartbeats:
    """Publishes a heartbeat per edge every ``interval`` s from a thread, like edge runtimes.

    ``edges`` maps edge id to (url, ready versions of ``digits``); change it while running.
    """

    nats_url: str
    user: str
    password: str
    edges: dict[str, tuple[str, list[int]]]
    interval: float = 0.5
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _left: list[str] = field(default_factory=list)

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def leave(self, edge_id: str) -> None:
        self.edges.pop(edge_id, None)
        self._left.append(edge_id)

    async def _run(self) -> None:
        nc = await nats.connect(self.nats_url, user=self.user, password=self.password)
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                for edge_id, (url, versions) in list(self.edges.items()):
                    beat = Heartbeat(
                        edge_id=edge_id,
                        url=url,
                        seq=seq,
                        ts=time.time(),
                        models={"digits": ModelState(ready=versions)},
                    )
                    await nc.publish(subjects.heartbeat(edge_id), beat.encode())
                while self._left:
                    await nc.publish(subjects.leave(self._left.pop()), b"")
                await nc.flush()
                await asyncio.sleep(self.interval)
        finally:
            await nc.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class GatewayStack:
    url: str
    keys: dict[str, str]  # name -> key: admin, infer, slow (infer, 1 request/s)
    edges: dict[str, TritonServer]
    nats: NatsServer
    gateway: ManagedProcess
    heartbeats: Heartbeats
    root: Path

    def auth(self, name: str = "infer") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = "infer",
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; (status, lowercase headers, body) whatever the status."""
        sent = dict(headers or {})
        if key is not None:
            sent.update(self.auth(key))
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    def edges_view(self) -> dict[str, dict[str, Any]]:
        status, _, body = self.request("GET", "/v1/edges")
        assert status == 200, body
        return {e["edge_id"]: e for e in json.loads(body)["edges"]}

    def wait_for_edges(self, edge_ids: set[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.edges_view()) == edge_ids:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the gateway never saw exactly {edge_ids}: {self.edges_view()}")

    def stop(self) -> None:
        self.heartbeats.stop()
        self.gateway.stop(timeout=15)
        for server in self.edges.values():
            server.stop()
        self.nats.process.stop()


def _write_keys(root: Path) -> tuple[dict[str, str], Path]:
    names = ("admin", "infer", "slow", "metrics")
    keys = {name: generate_key() for name in names}
    lines = [
        key_line("admin", "ops", keys["admin"]),
        key_line("infer", "app", keys["infer"]),
        key_line("infer", "slow", keys["slow"], rate_per_s=1.0),
        key_line("metrics", "prometheus", keys["metrics"]),
    ]
    path = root / "secrets" / "api-keys"
    write_secret(path, "\n".join(lines))
    return keys, path


def start_gateway(root: Path, server: NatsServer, keys_file: Path, **env: str) -> ManagedProcess:
    port = free_port()
    settings = {
        "PORT": str(port),
        "NATS_URL": server.url,
        "NATS_USER": "gateway",
        "NATS_PASSWORD_FILE": str(server.password_files["gateway"]),
        "API_KEYS_FILE": str(keys_file),
        "LOG_JSON": "false",
        "MAX_BODY_BYTES": str(1024 * 1024),
        "EJECT_BASE_S": "1.0",
        "PROBE_INTERVAL_S": "0.2",
        **env,
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    environ.update({f"FEDGATE_GATEWAY_{k}": v for k, v in settings.items()})
    proc = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "gateway"],
        log_path=root / "gateway.log",
        env=environ,
        ports={"http": port},
    )
    proc.start()
    return proc


def start_stack(root: Path, signed: SignedArtifacts) -> GatewayStack:
    """edge-1 serves digits version 1, edge-2 version 2 (different weights)."""
    seeds = {"edge-1": signed.artifacts, "edge-2": signed_version(root, signed, 2, 0.5)}
    server = start_nats(root / "nats", ["gateway", "edge-1"])
    # the gateway routes to enrolled edges only; edge-9 is the dead edge a test adds
    enroll_edges(server, [*seeds, "edge-9"], "gateway")
    edges: dict[str, TritonServer] = {}
    gateway: ManagedProcess | None = None
    heartbeats: Heartbeats | None = None
    try:
        for edge_id, seed in seeds.items():
            edges[edge_id] = started(  # a fresh directory per attempt: the repository is new
                lambda e=edge_id, d=seed: start_triton(root / e / os.urandom(3).hex(), d, signed)
            )
        keys, keys_file = _write_keys(root)
        gateway = started(lambda: start_gateway(root, server, keys_file))
        for triton in edges.values():
            triton.process.wait_ready(triton.live, 120)
            triton.load("digits")
        url = f"http://127.0.0.1:{gateway.ports['http']}"
        gateway.wait_ready(lambda: _live(url), 60)
        heartbeats = Heartbeats(
            server.url,
            "edge-1",
            server.users["edge-1"],
            {"edge-1": (edges["edge-1"].url, [1]), "edge-2": (edges["edge-2"].url, [2])},
        )
        heartbeats.start()
        stack = GatewayStack(url, keys, edges, server, gateway, heartbeats, root)
        stack.wait_for_edges({"edge-1", "edge-2"})
        return stack
    except BaseException:
        if heartbeats is not None:
            heartbeats.stop()
        if gateway is not None:
            gateway.stop(timeout=10)
        for triton in edges.values():
            triton.stop()
        server.process.stop()
        raise


def _live(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/live", timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False
