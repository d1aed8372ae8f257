"""Fault injection against the real local stack (``fedgate.launcher.Stack``: nats-server,
trainer, three edge runtimes each with its own tritonserver, the gateway) under
concurrent client load through the gateway.

1. Triton's model-control API refuses calls without the edge's secret (on the stack).
2. A version signed by the trusted key whose ONNX refers to ``../../etc/passwd`` is rolled
   out: every edge refuses it, the rollout fails, nothing 5xx, version 1 keeps serving.
3. ``kill -9`` of one edge's tritonserver (and its python-backend stub) under load: the
   gateway routes around it; 5xx (or failed connections) only among requests in flight at
   the kill, and none after; the edge runtime restarts its Triton, which serves again.
4. ``kill -9`` of a whole edge (runtime and Triton) in the middle of a canary: the rollout
   still ends (promoted or rolled back) and the other edges serve what it decided;
   5xx bounded the same way.
5. Afterwards (stack stopped): no secret (NATS passwords, API keys, Triton control
   secrets, private keys) in any log, and the per-role NATS permissions were never
   violated by the services, faults and all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import numpy as np
import onnx
import pytest

from fedcore.artifact import MANIFEST, sign_version_dir
from fedcore.artifact_store import upload_version
from fedcore.keys import load_ed25519
from fedcore.models import get_spec
from fedcore.process import free_port
from fedcore.subjects import inbox_prefix
from fedgate.launcher import Stack, StackConfig
from fedgate.status import triton_restarts
from tests.conftest import processes_mentioning

pytestmark = pytest.mark.slow

MODEL = "digits"
ROW = [0.25] * 64
EDGE_SETTINGS = {"LEARNING_ENABLED": "false", "EXIT_TIMEOUT_S": "3", "HEARTBEAT_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("fault-stack")
    config = StackConfig(
        data_dir=data_dir,
        edges=3,
        port=free_port(),
        overrides={"FEDGATE_EDGE_": EDGE_SETTINGS, "FEDGATE_TRAINER_": {"BOOTSTRAP_EPOCHS": "2"}},
    )
    running = Stack(config)
    loggers = [logging.getLogger(name) for name in ("fedcore", "fedgate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # what the launcher logs in this process
        logger.setLevel(logging.DEBUG)
        logger.addHandler(CAPTURED)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(CAPTURED)
            logger.setLevel(level)
    assert processes_mentioning(str(data_dir)) == []


class Captured(logging.Handler):
    """Every record logged in the test process, message and extra fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__!r}")


CAPTURED = Captured()


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Shot:
    start: float
    end: float
    status: int  # 0: the gateway itself could not be reached or answered garbage
    edge: str


@dataclass
class TimedLoad:
    """``clients`` clients sending one-row requests through the gateway in a loop, each
    request timed; 5xx and failed connections are what the faults may cause."""

    url: str
    key: str
    clients: int = 6
    shots: list[Shot] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> TimedLoad:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _client(self) -> None:
        body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                async with self._session.post(
                    f"{self.url}/v2/models/{MODEL}/infer", json=body
                ) as r:
                    await r.read()
                    status, edge = r.status, r.headers.get("x-fedgate-edge", "")
            except (aiohttp.ClientError, TimeoutError):
                status, edge = 0, ""
            self.shots.append(Shot(start, time.monotonic(), status, edge))

    def bad(self) -> list[Shot]:
        return [s for s in self.shots if s.status >= 500 or s.status == 0]

    def inflight_at(self, t: float) -> list[Shot]:
        return [s for s in self.shots if s.start <= t < s.end]

    def served_by(self, since: float) -> set[str]:
        return {s.edge for s in self.shots if s.start > since and s.status == 200}


def check_bounded(load: TimedLoad, killed_at: float) -> dict[str, int]:
    """5xx only among the requests in flight at ``killed_at``; none started after it."""
    bad, inflight = load.bad(), load.inflight_at(killed_at)
    assert len(bad) <= len(inflight), (bad, len(inflight))
    assert all(s.start <= killed_at for s in bad), bad
    return {"requests": len(load.shots), "in_flight_at_kill": len(inflight), "5xx": len(bad)}


def call(stack: Stack, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {stack.api_key('admin')}"}
    req = urllib.request.Request(
        stack.gateway_url + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def fleet(stack: Stack) -> dict[str, dict[str, Any]]:
    status, body = call(stack, "GET", "/v1/edges")
    assert status == 200, body
    return {e["edge_id"]: e for e in body["edges"]}


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_rollout(stack: Stack, rollout_id: str, states: set[str], timeout: float) -> Any:
    def done() -> Any:
        status, r = call(stack, "GET", f"/v1/models/{MODEL}/rollouts/{rollout_id}")
        return r if status == 200 and r["state"] in states and r["settled"] else None

    return wait_for(done, timeout, f"rollout {rollout_id} to end in {states}")


def triton_pids(stack: Stack, edge_id: str) -> list[int]:
    """The tritonservers of ``edge_id`` (each process group holds its python-backend stub)."""
    repo = str(stack.config.data_dir / "edges" / edge_id / "model_repository")
    return [
        int(p.split(":")[0])
        for p in processes_mentioning(repo)
        if "tritonserver " in p and "triton_python_backend_stub" not in p
    ]


def triton_pid(stack: Stack, edge_id: str) -> int:
    found = triton_pids(stack, edge_id)
    assert len(found) == 1, found
    return found[0]


def sign_version(stack: Stack, root: Path, version: int, params: np.ndarray) -> Path:
    from trainer.bootstrap import write_version

    key = load_ed25519(stack.config.data_dir / "keys" / "trainer-signing.key")
    directory = root / MODEL / str(version)
    write_version(get_spec(MODEL), params.astype("float32"), directory, key, version=version)
    return directory


async def upload(stack: Stack, directory: Path, version: int) -> None:
    password = (stack.config.data_dir / "secrets" / "nats-trainer.pass").read_text().strip()
    nc = await nats.connect(
        stack.nats_url, user="trainer", password=password, inbox_prefix=inbox_prefix("trainer")
    )
    try:
        await upload_version(nc.jetstream(), MODEL, version, directory)
    finally:
        await nc.close()


def v1_params(stack: Stack) -> np.ndarray:
    path = stack.config.data_dir / "trainer" / "state" / f"{MODEL}-1.npy"
    return np.load(path, allow_pickle=False)


# -- the faults ----------------------------------------------------------------------------


def test_triton_model_control_needs_the_edge_secret(stack: Stack) -> None:
    port = stack.edge_ports["edge-3"].http
    for headers in ({}, {"fedgate-control-key": "guess"}, {"Authorization": "Bearer x"}):
        for action in ("unload", "load"):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/repository/models/{MODEL}/{action}",
                data=b"{}",
                method="POST",
                headers=headers,
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=10)
            assert 400 <= info.value.code < 500
            assert b"restricted" in info.value.read().lower()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready") as resp:
        assert resp.status == 200  # still loaded


async def test_signed_model_with_external_data_is_refused_by_every_edge(
    stack: Stack, tmp_path: Path
) -> None:
    directory = sign_version(stack, tmp_path, 9, v1_params(stack))
    (directory / MANIFEST).unlink()
    model = onnx.load(str(directory / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../../etc/passwd"
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    key = load_ed25519(stack.config.data_dir / "keys" / "trainer-signing.key")
    sign_version_dir(directory, key, model=MODEL, version=9)  # the trusted key signed it
    await upload(stack, directory, 9)
    async with TimedLoad(stack.gateway_url, stack.api_key()) as load:
        status, r = await asyncio.to_thread(
            call, stack, "POST", f"/v1/models/{MODEL}/rollouts", {"version": 9}
        )
        assert status == 201, r
        done = await asyncio.to_thread(wait_rollout, stack, r["id"], {"failed"}, 60)
    assert "external-data" in done["reason"], done["reason"]
    assert load.bad() == [] and len(load.shots) > 0
    for edge in fleet(stack).values():
        assert edge["models"][MODEL]["ready"] == [1]
        assert "external-data" in edge["models"][MODEL]["failed"]["9"]


async def test_tritonserver_killed_under_load(stack: Stack, record_property: Any) -> None:
    pid = triton_pid(stack, "edge-1")
    async with TimedLoad(stack.gateway_url, stack.api_key()) as load:
        await asyncio.sleep(2.0)
        assert load.served_by(0) >= {"edge-1", "edge-2"}
        killed_at = time.monotonic()
        os.killpg(pid, signal.SIGKILL)  # Triton and its stub
        # the edge runtime restarts its Triton with the verified versions, and serves again
        await asyncio.to_thread(
            wait_for, lambda: triton_pids(stack, "edge-1") not in ([], [pid]), 60, "a new Triton"
        )
        await asyncio.to_thread(
            wait_for, lambda: "edge-1" in load.served_by(killed_at + 0.5), 60, "edge-1 back"
        )
        await asyncio.sleep(1.0)
    numbers = check_bounded(load, killed_at)
    restarts = triton_restarts(stack.metrics_urls()["edge-1"])
    record_property("triton_kill", {**numbers, "triton_restarts": restarts})
    assert load.served_by(killed_at + 0.5) == {"edge-1", "edge-2", "edge-3"}
    assert restarts == 1
    assert fleet(stack)["edge-1"]["models"][MODEL]["ready"] == [1]


async def test_edge_killed_mid_rollout(stack: Stack, tmp_path: Path, record_property: Any) -> None:
    rng = np.random.default_rng(3)
    params = v1_params(stack)
    directory = sign_version(stack, tmp_path, 2, params + rng.normal(0, 1e-3, params.shape))
    await upload(stack, directory, 2)
    edge2 = next(p for p in stack.processes if p.name == "edge-2")
    triton2 = triton_pid(stack, "edge-2")
    spec = {
        "version": 2,
        "stages": [20, 50],
        "window_s": 4,
        "min_requests": 10,
        "gates": {"max_error_rate": 0.05, "max_p99_ratio": 5.0, "p99_floor_ms": 200.0},
    }
    async with TimedLoad(stack.gateway_url, stack.api_key()) as load:
        status, r = await asyncio.to_thread(
            call, stack, "POST", f"/v1/models/{MODEL}/rollouts", spec
        )
        assert status == 201, r

        def in_canary() -> bool:
            _, now = call(stack, "GET", f"/v1/models/{MODEL}/rollouts/{r['id']}")
            return bool(now["state"] == "canary")

        await asyncio.to_thread(wait_for, in_canary, 60, "the canary")
        await asyncio.sleep(1.0)
        killed_at = time.monotonic()
        assert edge2.pid is not None
        os.kill(edge2.pid, signal.SIGKILL)  # the machine is gone: runtime and Triton
        os.killpg(triton2, signal.SIGKILL)
        done = await asyncio.to_thread(
            wait_rollout, stack, r["id"], {"promoted", "rolled_back"}, 90
        )
        await asyncio.sleep(1.0)
    numbers = check_bounded(load, killed_at)
    record_property("edge_kill", {**numbers, "outcome": done["state"], "reason": done["reason"]})
    serving = [2] if done["state"] == "promoted" else [1]
    edges = fleet(stack)
    assert set(edges) == {"edge-1", "edge-3"}  # edge-1 restarted its Triton in the test before
    assert all(edges[e]["models"][MODEL]["ready"] == serving for e in edges), edges
    assert "edge-2" not in load.served_by(killed_at + 4.0)  # its heartbeat expired (3.5 s)


def test_zz_no_secret_in_any_log_and_no_permission_violation(stack: Stack) -> None:
    stack.stop()  # everything flushed and closed
    data_dir = stack.config.data_dir
    secrets: dict[str, str] = {}
    for path in (data_dir / "secrets").iterdir():
        if path.name != "gateway-api-keys":  # hashes of the keys, not secrets
            secrets[path.name] = path.read_text().strip()
    for path in (data_dir / "keys").rglob("*.key"):
        body = "".join(path.read_text().splitlines()[1:-1])  # PEM body: the key material
        secrets[str(path.relative_to(data_dir))] = body or path.read_text().strip()
    assert len(secrets) >= 4 + 3 + 3 + 2  # NATS users, Triton secrets, edge keys, trainer keys
    logs = [
        p for p in data_dir.rglob("*") if p.is_file() and (p.suffix == ".log" or "logs" in p.parts)
    ]
    assert len(logs) >= 9, logs  # every service, bootstrap, nats-server, every Triton
    for log in logs:
        text = log.read_text(errors="replace")
        leaked = [name for name, value in secrets.items() if len(value) >= 16 and value in text]
        assert leaked == [], f"{log} holds {leaked}"
    captured = "\n".join(CAPTURED.lines)
    assert "started gateway" in captured
    assert [name for name, value in secrets.items() if value in captured] == []
    nats_log = (data_dir / "logs" / "nats-server.log").read_text()
    assert "Violation" not in nats_log, [ln for ln in nats_log.splitlines() if "Violation" in ln]
