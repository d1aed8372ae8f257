"""``POST /v1/feedback`` through a real nats-server to edges' feedback responders and spools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from edge_runtime.feedback import FeedbackResponder
from edge_runtime.spool import JoinResult, Spool, spool_path
from fedcore import subjects
from fedcore.models import get_spec
from fedcore.wire import FeedbackReply, FeedbackRequest
from gateway.app import create_app
from gateway.auth import generate_key, key_line
from gateway.settings import GatewaySettings
from tests.conftest import NatsServer
from tests.test_edge_spool import capture_module

INFER_KEY = generate_key()


@dataclass
class Fleet:
    http: httpx.AsyncClient
    writers: dict[str, Any]
    spools: dict[str, Spool]

    async def post(self, body: dict[str, Any], key: str | None = INFER_KEY) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self.http.post("/v1/feedback", json=body, headers=headers)


def serve_sample(writer: Any, request_id: str) -> None:
    x = np.zeros((1, 64), np.float32)
    writer.offer(request_id, [x], [np.zeros((1, 10), np.float32)])


@pytest.fixture
async def fleet(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Fleet]:
    """Two edges (spool, capture writer, responder) and a gateway, all on one nats-server."""
    conns: list[NATS] = []
    writers, spools, responders = {}, {}, []
    for edge in ("edge-1", "edge-2"):
        path = spool_path(tmp_path / edge, "digits")
        spools[edge] = Spool(path)
        writers[edge] = capture_module()["CaptureWriter"](str(path), 1.0, 2, 100, version=1)
        nc = await nats.connect(nats_server.url, user=edge, password=nats_server.users[edge])
        conns.append(nc)
        responder = FeedbackResponder(edge, {"digits": spools[edge]})
        await responder.start(nc)
        responders.append(responder)
    gateway_nc = await nats.connect(
        nats_server.url, user="gateway", password=nats_server.users["gateway"]
    )
    conns.append(gateway_nc)
    settings = GatewaySettings(
        nats_user="gateway",
        nats_password_file=nats_server.password_files["gateway"],
        api_keys=key_line("infer", "tester", INFER_KEY),
    )
    app = create_app(settings, bus=False)
    app.api.state.feedback.bind(gateway_nc)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        yield Fleet(http, writers, spools)
    for responder in responders:
        await responder.stop()
    for writer in writers.values():
        writer.close()
    for spool in spools.values():
        spool.close()
    for nc in conns:
        await nc.close()


async def test_the_edge_that_served_joins_the_label(fleet: Fleet) -> None:
    serve_sample(fleet.writers["edge-2"], "req-a")
    # sent at once: the sample may still be queued in the capture writer (50 ms flushes)
    resp = await fleet.post({"model": "digits", "id": "req-a", "label": 7, "weight": 2.0})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "joined", "id": "req-a", "edge": "edge-2"}
    data = fleet.spools["edge-2"].labelled(get_spec("digits"), 0.0)
    assert data.y_train.tolist() == [7] and data.w_train.tolist() == [2.0]
    assert fleet.spools["edge-1"].stats().labelled == 0


async def test_expired_unknown_and_joined_elsewhere(fleet: Fleet) -> None:
    for i in range(4):  # capacity 2: req-0 and req-1 are evicted on edge-1
        serve_sample(fleet.writers["edge-1"], f"req-{i}")
    fleet.writers["edge-1"].flush()
    expired = await fleet.post({"model": "digits", "id": "req-0", "label": 1})
    assert expired.status_code == 410
    assert "req-0" in expired.json()["error"] and "edge-1" in expired.json()["error"]
    unknown = await fleet.post({"model": "digits", "id": "never-seen", "label": 1})
    assert unknown.status_code == 404 and "never-seen" in unknown.json()["error"]
    # the same id expired on one edge and live on another: the live one wins
    serve_sample(fleet.writers["edge-2"], "req-1")
    fleet.writers["edge-2"].flush()
    both = await fleet.post({"model": "digits", "id": "req-1", "label": 3})
    assert both.status_code == 200 and both.json()["edge"] == "edge-2"


@pytest.mark.parametrize(
    ("body", "status", "starts"),
    [
        ({"model": "digits", "id": "r", "label": 10}, 422, "label: 10 is not a class"),
        ({"model": "digits", "id": "r", "label": -1}, 422, "label:"),
        ({"model": "digits", "id": "r", "label": 2.5}, 422, "label:"),
        ({"model": "digits", "id": "r", "label": True}, 422, "label:"),
        ({"model": "digits", "id": "r", "label": "3"}, 422, "label:"),
        ({"model": "digits", "id": "r", "label": 3, "weight": 0}, 422, "weight:"),
        ({"model": "digits", "id": "r", "label": 3, "weight": "x"}, 422, "weight:"),
        ({"model": "digits", "id": "", "label": 3}, 422, "id:"),
        ({"model": "digits", "id": "has space", "label": 3}, 422, "id:"),
        ({"model": "digits", "label": 3}, 422, "id:"),
        ({"model": "digits", "id": "r", "label": 3, "extra": 1}, 422, "extra:"),
        ({"model": "cats", "id": "r", "label": 3}, 404, "unknown model 'cats'"),
    ],
)
async def test_malformed_feedback_is_refused_naming_the_field(
    fleet: Fleet, body: dict[str, Any], status: int, starts: str
) -> None:
    resp = await fleet.post(body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"].startswith(starts), resp.text


async def test_feedback_needs_a_key(fleet: Fleet) -> None:
    resp = await fleet.post({"model": "digits", "id": "r", "label": 1}, key=None)
    assert resp.status_code == 401
    bad_json = await fleet.http.post(
        "/v1/feedback",
        content=b"{not json",
        headers={"authorization": f"Bearer {INFER_KEY}", "content-type": "application/json"},
    )
    assert bad_json.status_code == 422


async def test_responder_ignores_what_is_not_for_it(tmp_path: Path) -> None:
    spool = Spool(spool_path(tmp_path, "digits"))
    responder = FeedbackResponder("edge-9", {"digits": spool}, retry_after_s=0.0)
    try:
        assert await responder.handle(b"not json") is None
        other = FeedbackRequest(model="other", id="x", label=1).encode()
        assert await responder.handle(other) is None
        too_big = FeedbackRequest(model="digits", id="x", label=12).encode()
        assert await responder.handle(too_big) is None
        assert (
            await responder.handle(FeedbackRequest(model="digits", id="x", label=1).encode())
            is None
        )
    finally:
        spool.close()
    assert subjects.feedback("digits") == "fedgate.feedback.digits"
    assert FeedbackReply(edge_id="edge-9", status="expired").encode() == (
        b'{"edge_id":"edge-9","status":"expired"}'
    )
    assert JoinResult.EXPIRED.value == "expired"
