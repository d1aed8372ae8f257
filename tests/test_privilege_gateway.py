"""Least privilege at the gateway: which key may call which route.

Every operation in ``/openapi.json`` is called without a key, with a wrong or malformed
key, with the ``metrics``, the ``infer`` and the ``admin`` key (a real gateway process on a
real nats-server; no edge is needed to be refused). Without a valid key only the health
routes answer; a metrics key reads /metrics only; an infer key gets 403 from exactly the
admin routes; and every route that changes
state is an admin route, so a new one cannot slip in open (it fails here until listed).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedcore.process import ManagedProcess
from tests.conftest import NatsServer, processes_mentioning, start_nats
from tests.gateway_harness import _live, _write_keys, start_gateway

PUBLIC = {"GET /v2/health/live", "GET /v2/health/ready", "GET /v1/health/ready"}
ADMIN = {
    "PUT /v1/models/{model}/routing",
    "DELETE /v1/models/{model}/routing",
    "POST /v1/models/{model}/rollouts",
    "GET /v1/models/{model}/rollouts",
    "GET /v1/models/{model}/rollouts/{rollout_id}",
    "POST /v1/models/{model}/rollouts/{rollout_id}/promote",
    "POST /v1/models/{model}/rollouts/{rollout_id}/rollback",
}
NOT_ADMIN_BUT_WRITES = {
    "POST /v2/models/{model}/infer": "inference is what infer keys are for",
    "POST /v2/models/{model}/versions/{version}/infer": "inference",
    "POST /v1/feedback": "labels for the client's own requests, joined at the edge",
}
PARAMS = {"{model}": "digits", "{version}": "1", "{rollout_id}": "r-000000000000"}
BODIES = {
    "PUT /v1/models/{model}/routing": {"stable": 1},
    "POST /v1/models/{model}/rollouts": {"version": 2},
    "POST /v1/feedback": {"model": "digits", "id": "req-1", "label": 3},
}


@dataclass
class Gateway:
    url: str
    keys: dict[str, str]
    nats: NatsServer
    process: ManagedProcess

    def call(self, op: str, authorization: str | None) -> tuple[int, bytes]:
        method, path = op.split(" ", 1)
        for name, value in PARAMS.items():
            path = path.replace(name, value)
        body = BODIES.get(op)
        data = json.dumps(body).encode() if body is not None else None
        if data is None and method in ("POST", "PUT"):
            data = b"{}"
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root: Path = tmp_path_factory.mktemp("privilege-gateway")
    server = start_nats(root / "nats", ["gateway"])
    process: ManagedProcess | None = None
    try:
        keys, keys_file = _write_keys(root)
        process = start_gateway(root, server, keys_file)
        url = f"http://127.0.0.1:{process.ports['http']}"
        process.wait_ready(lambda: _live(url), 60)
        yield Gateway(url, keys, server, process)
    finally:
        if process is not None:
            process.stop(timeout=15)
        server.process.stop()
    assert processes_mentioning(str(root)) == []


@pytest.fixture(scope="module")
def operations(gateway: Gateway) -> dict[str, dict[str, object]]:
    with urllib.request.urlopen(gateway.url + "/openapi.json", timeout=10) as resp:
        doc = json.loads(resp.read())
    return {
        f"{method.upper()} {path}": op
        for path, methods in doc["paths"].items()
        for method, op in methods.items()
    }


def responses(spec: dict[str, object]) -> dict[str, object]:
    found = spec["responses"]
    assert isinstance(found, dict)
    return found


def test_every_state_changing_route_is_an_admin_route(
    operations: dict[str, dict[str, object]],
) -> None:
    writes = {op for op in operations if not op.startswith("GET ")}
    assert writes - ADMIN == set(NOT_ADMIN_BUT_WRITES)
    assert set(operations) >= ADMIN
    documented_403 = {op for op, spec in operations.items() if "403" in responses(spec)}
    assert documented_403 == ADMIN


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer fgk_not-a-key",
        "Bearer ",
        "Basic YWRtaW46YWRtaW4=",
        "bearer",
        "Bearer {admin}x",
        "Bearer {admin} {admin}",
        "Bearer " + "A" * 8192,
    ],
    ids=["none", "unknown", "empty", "basic", "no token", "admin+x", "twice", "8 KiB"],
)
def test_without_a_valid_key_only_health_answers(
    gateway: Gateway, operations: dict[str, dict[str, object]], authorization: str | None
) -> None:
    if authorization is not None:
        authorization = authorization.format(admin=gateway.keys["admin"])
    for op in operations:
        status, body = gateway.call(op, authorization)
        if op in PUBLIC:
            assert status in (200, 400), (op, status)
        else:
            assert status == 401, (op, status, body[:200])
            assert json.loads(body)["error"]


def test_an_infer_key_cannot_call_admin_routes(
    gateway: Gateway, operations: dict[str, dict[str, object]]
) -> None:
    for op in operations:
        status, body = gateway.call(op, f"Bearer {gateway.keys['infer']}")
        if op in ADMIN:
            assert status == 403, (op, status, body[:200])
            assert "needs 'admin'" in json.loads(body)["error"]
        else:
            assert status not in (401, 403), (op, status, body[:200])


def test_a_metrics_key_reads_the_metrics_and_nothing_else(
    gateway: Gateway, operations: dict[str, dict[str, object]]
) -> None:
    """A scraper's key (role ``metrics``): Prometheus can read /metrics with it, and a
    leaked one runs no inference and reads no fleet, rounds or rollouts."""
    assert "GET /metrics" in operations
    for op in operations:
        status, body = gateway.call(op, f"Bearer {gateway.keys['metrics']}")
        if op == "GET /metrics":
            assert status == 200 and b"fedgate_gateway_" in body, (op, status)
        elif op in PUBLIC:
            assert status in (200, 400), (op, status)
        else:
            assert status == 403, (op, status, body[:200])
            assert "has role 'metrics'" in json.loads(body)["error"], op


def test_the_admin_key_is_refused_nowhere(
    gateway: Gateway, operations: dict[str, dict[str, object]]
) -> None:
    for op in operations:
        status, body = gateway.call(op, f"Bearer {gateway.keys['admin']}")
        assert status not in (401, 403), (op, status, body[:200])
        assert status < 500 or status == 503, (op, status, body[:200])  # 503: no edge


def test_keys_never_reach_the_log(gateway: Gateway) -> None:
    log = (gateway.process.log_path).read_text()
    for key in gateway.keys.values():
        assert key not in log
        assert key.removeprefix("fgk_")[:16] not in log
