"""Request ids the gateway logs for failed and retried inference requests."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from fedcore.process import free_port
from fedcore.wire import Heartbeat, ModelState
from gateway.app import create_app
from gateway.fleet import Fleet
from gateway.request_ids import SCAN_BYTES, client_id, request_id
from gateway.settings import GatewaySettings


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id":"req-7","inputs":[]}', "req-7"),
        (b'{ "id" : "a\\"b", "inputs": []}', 'a"b'),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"id":"late"}', "late"),
        (b'{"inputs":[]}', None),
        (b'{"id":"has space"}', None),  # not a valid request id
        (b'{"id":"' + b"x" * 257 + b'"}', None),
        (b'{"id":"bad\\u0000"}', None),
        (b"not json at all", None),
    ],
)
def test_client_ids(body: bytes, expected: str | None) -> None:
    assert client_id(body) == expected


def test_binary_requests_are_searched_in_their_json_header_only() -> None:
    header = json.dumps({"id": "bin-1", "inputs": []}).encode()
    tensor = b'"id":"not-this"' * 10
    assert client_id(header + tensor, str(len(header)).encode()) == "bin-1"
    assert client_id(b'{"inputs":[]}' + tensor, b"13") is None


def test_only_the_start_of_a_large_body_is_searched() -> None:
    body = b'{"inputs":[{"data":[' + b"0," * SCAN_BYTES + b'0]}],"id":"far"}'
    assert client_id(body) is None
    generated = request_id(body)
    assert re.fullmatch(r"gw-[0-9a-f]{16}", generated)
    assert request_id(body) != generated
    assert request_id(b'{"id":"mine"}') == "mine"


async def test_retried_and_failed_requests_are_logged_with_their_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two edges that refuse connections: one retry, then 503; both lines carry the id."""
    fleet = Fleet(ttl=60.0)
    for edge in ("edge-1", "edge-2"):
        fleet.observe(
            Heartbeat(
                edge_id=edge,
                url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
                seq=1,
                ts=1.0,
                models={"digits": ModelState(ready=[1])},
            )
        )
    settings = GatewaySettings.model_validate(
        {
            "nats_user": "gateway",
            "nats_password_file": tmp_path / "p",
            "dev_mode": True,
            "log_json": False,
        }
    )
    app = create_app(settings, fleet=fleet, bus=False)
    body = (
        b'{"id":"req-42","inputs":[{"name":"pixels","shape":[1,1],"datatype":"FP32","data":[0]}]}'
    )
    transport = httpx.ASGITransport(app=app)
    caplog.set_level(logging.INFO, logger="gateway.dataplane")
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            resp = await client.post("/v2/models/digits/infer", content=body)
            assert resp.status_code == 503
            ok = await client.post("/v2/models/digits/infer", content=b'{"inputs":[]}')
            assert ok.status_code == 503
    finally:
        await app.state.upstream.close()
    lines = [r for r in caplog.records if r.name == "gateway.dataplane"]
    first = [r for r in lines if getattr(r, "request_id", None) == "req-42"]
    assert [r.levelno for r in first] == [logging.INFO, logging.WARNING]
    assert "retrying" in first[0].getMessage() and "edge-" in first[0].getMessage()
    assert "no edge could serve" in first[1].getMessage()
    generated = {getattr(r, "request_id", "") for r in lines} - {"req-42"}
    assert len(generated) == 1 and generated.pop().startswith("gw-")  # one id per request
