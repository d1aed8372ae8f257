"""The gateway's own readiness does not depend on the edges (issue #17, finding 5).

A real nats-server and a real ``python -m gateway`` with no edge at all: the probes'
endpoint ``/v1/health/ready`` is 200 and the control-plane APIs answer, while model
readiness (``/v2/health/ready``, ``/v2/models/{m}/ready``) still says no edge serves.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from fedcore.keys import write_secret
from gateway.auth import generate_key, key_line
from tests.conftest import start_nats
from tests.gateway_harness import start_gateway


def status(url: str, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_gateway_is_ready_with_no_edge(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "nats", ["gateway"])
    admin = generate_key()
    keys_file = tmp_path / "api-keys"
    write_secret(keys_file, key_line("admin", "ops", admin))
    gateway = None
    try:
        gateway = start_gateway(tmp_path, server, keys_file)
        url = f"http://127.0.0.1:{gateway.ports['http']}"
        gateway.wait_ready(lambda: status(url + "/v2/health/live")[0] == 200, 60)
        assert status(url + "/v1/health/ready") == (200, b"")
        # no edge: model readiness says so, and it stays the OIP's answer
        assert status(url + "/v2/health/ready")[0] == 400
        assert status(url + "/v2/models/digits/ready", admin)[0] == 400
        # the control plane answers: fleet (empty) and rollouts of a model
        code, body = status(url + "/v1/edges", admin)
        assert code == 200 and json.loads(body) is not None
        assert status(url + "/v1/models/digits/rollouts", admin)[0] == 200
        spec = json.loads(status(url + "/openapi.json")[1])
        assert set(spec["paths"]["/v1/health/ready"]["get"]["responses"]) == {"200", "503"}
    finally:
        if gateway is not None:
            gateway.stop(timeout=10)
        server.process.stop()
