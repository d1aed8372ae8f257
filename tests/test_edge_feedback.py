"""``POST /v1/feedback`` through a real nats-server to edges' feedback responders and spools."""

from __future__ import annotations

import json
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
from fedcore.keys import write_secret
from fedcore.models import get_spec
from fedcore.wire import FeedbackReply, FeedbackRequest
from gateway.app import create_app
from gateway.auth import generate_key, key_line
from gateway.feedback_token import HEADER as TOKEN_HEADER
from gateway.feedback_token import FeedbackTokens
from gateway.settings import GatewaySettings
from tests.conftest import NatsServer
from tests.test_edge_spool import capture_module

INFER_KEY = generate_key()
OTHER_KEY = generate_key()
FEEDBACK_SECRET = "feedback-secret-0123456789abcdef"


@dataclass
class Fleet:
    http: httpx.AsyncClient
    writers: dict[str, Any]
    spools: dict[str, Spool]

    tokens: FeedbackTokens

    async def post(
        self, body: dict[str, Any], key: str | None = INFER_KEY, token: bytes | None = None
    ) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        if token is not None:
            headers[TOKEN_HEADER] = token.decode()
        return await self.http.post("/v1/feedback", json=body, headers=headers)


def serve_sample(writer: Any, request_id: str, key: str = "tester", fill: float = 0.0) -> None:
    """Capture a request as ``model.py`` does when the gateway forwarded it for ``key``."""
    x = np.full((1, 64), fill, np.float32)
    params = json.dumps({"x-fedgate-key": key})
    rid = capture_module()["bound_id"](request_id, params)
    writer.offer(rid, [x], [np.zeros((1, 10), np.float32)])


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
    secret = tmp_path / "feedback.secret"
    write_secret(secret, FEEDBACK_SECRET)
    settings = GatewaySettings(
        nats_user="gateway",
        nats_password_file=nats_server.password_files["gateway"],
        api_keys=key_line("infer", "tester", INFER_KEY)
        + "\n"
        + key_line("infer", "other", OTHER_KEY),
        feedback_secret_file=secret,
    )
    app = create_app(settings, bus=False)
    app.api.state.feedback.bind(gateway_nc)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        assert app.state.tokens is not None
        yield Fleet(http, writers, spools, app.state.tokens)
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


async def test_a_label_binds_to_the_key_that_made_the_request(fleet: Fleet) -> None:
    serve_sample(fleet.writers["edge-1"], "req-own", key="tester")
    fleet.writers["edge-1"].flush()
    body = {"model": "digits", "id": "req-own", "label": 4}
    stranger = await fleet.post(body, key=OTHER_KEY)
    unknown = await fleet.post({**body, "id": "req-none"}, key=OTHER_KEY)
    # the same answer as an id nobody served: nothing says that the id exists
    assert stranger.status_code == unknown.status_code == 404
    assert stranger.json()["error"] == unknown.json()["error"].replace("req-none", "req-own")
    assert fleet.spools["edge-1"].stats().labelled == 0
    own = await fleet.post(body)
    assert own.status_code == 200 and own.json()["edge"] == "edge-1"


async def test_a_reused_id_is_another_keys_own_sample(fleet: Fleet) -> None:
    serve_sample(fleet.writers["edge-1"], "dup", key="tester", fill=1.0)
    serve_sample(fleet.writers["edge-1"], "dup", key="other", fill=2.0)
    fleet.writers["edge-1"].flush()
    assert fleet.spools["edge-1"].stats().samples == 2  # not overwritten
    assert (await fleet.post({"model": "digits", "id": "dup", "label": 1})).status_code == 200
    other = await fleet.post({"model": "digits", "id": "dup", "label": 2}, key=OTHER_KEY)
    assert other.status_code == 200
    data = fleet.spools["edge-1"].labelled(get_spec("digits"), 0.0)
    by_label = {
        int(y): float(x[0]) for x, y in zip(data.x_train["pixels"], data.y_train, strict=True)
    }
    assert by_label == {1: 1.0, 2: 2.0}


async def test_a_token_sends_the_label_to_the_serving_edge_only(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    spy = await nats.connect(nats_server.url, user="trainer", password=nats_server.users["trainer"])
    seen: list[str] = []

    async def on_msg(msg: Any) -> None:
        seen.append(msg.subject)

    sub = await spy.subscribe("fedgate.feedback.>", cb=on_msg)
    try:
        serve_sample(fleet.writers["edge-2"], "req-t")
        token = fleet.tokens.mint("digits", "edge-2", "tester")
        resp = await fleet.post({"model": "digits", "id": "req-t", "label": 5}, token=token)
        assert resp.status_code == 200 and resp.json()["edge"] == "edge-2", resp.text
        await spy.flush()
        assert seen == ["fedgate.feedback.digits-edge-2"]  # the fleet was not asked
        # another key's token, or another model's: 404 and nobody is asked
        seen.clear()
        stolen = fleet.tokens.mint("digits", "edge-2", "other")
        body = {"model": "digits", "id": "req-t", "label": 6}
        assert (await fleet.post(body, token=stolen)).status_code == 404
        await spy.flush()
        assert seen == []
        # a tampered token is ignored: the fleet is asked
        forged = token[:-2] + (b"AA" if not token.endswith(b"AA") else b"BB")
        assert (await fleet.post(body, token=forged)).status_code == 200
        await spy.flush()
        assert seen == ["fedgate.feedback.digits"]
        # the token's edge does not hold the id: the fleet is asked, the holder answers
        seen.clear()
        serve_sample(fleet.writers["edge-1"], "req-e1")
        resp = await fleet.post({"model": "digits", "id": "req-e1", "label": 3}, token=token)
        assert resp.status_code == 200 and resp.json()["edge"] == "edge-1"
    finally:
        await sub.unsubscribe()
        await spy.close()


def test_feedback_tokens_cannot_be_forged_or_outlive_their_ttl() -> None:
    tokens = FeedbackTokens(b"0123456789abcdef0123", ttl_s=100.0)
    token = tokens.mint("digits", "edge-1", "alice", now=1000.0)
    assert tokens.mint("digits", "edge-1", "alice", now=1040.0) is token  # cached
    served = tokens.verify(token.decode(), now=1050.0)
    assert served is not None and (served.model, served.edge, served.key) == (
        "digits",
        "edge-1",
        "alice",
    )
    assert tokens.verify(token.decode(), now=1100.0) is None  # expired
    payload, mac = token.decode().split(".")
    other = FeedbackTokens(b"another secret of 16+ bytes").mint("digits", "edge-9", "alice")
    assert tokens.verify(other.decode().split(".")[0] + "." + mac, now=1050.0) is None
    assert tokens.verify(payload + "." + other.decode().split(".")[1], now=1050.0) is None
    for junk in ("", ".", "a.b.c", "!!.??", "x" * 600):
        assert tokens.verify(junk, now=1050.0) is None
    with pytest.raises(ValueError, match="16 bytes"):
        FeedbackTokens(b"short")


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
