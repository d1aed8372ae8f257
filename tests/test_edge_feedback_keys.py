"""Feedback bound to the key that made the request, routed by the response's token: a real
tritonserver edge (``model.py`` capture), nats-server and gateway with API keys."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from fedcore.keys import write_secret
from fedcore.models import get_spec
from gateway.auth import generate_key, key_line
from gateway.feedback_token import HEADER as TOKEN_HEADER
from tests.conftest import NatsServer, SignedArtifacts
from tests.edge_harness import Stack, running_stack

pytestmark = pytest.mark.slow

ADMIN, ALICE, BOB = generate_key(), generate_key(), generate_key()
KEYS = "\n".join(
    [
        key_line("admin", "ops", ADMIN),
        key_line("infer", "alice", ALICE),
        key_line("infer", "bob", BOB),
    ]
)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def infer(stack: Stack, key: str, x: NDArray[Any], request_id: str) -> httpx.Response:
    body = {
        "id": request_id,
        "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}],
    }
    resp = await stack.http.post(
        f"{stack.gateway_url}/v2/models/digits/infer", json=body, headers=auth(key)
    )
    assert resp.status_code == 200, resp.text
    return resp


async def label(
    stack: Stack, key: str, request_id: str, value: int, token: str | None = None
) -> httpx.Response:
    headers = auth(key) | ({TOKEN_HEADER: token} if token else {})
    body = {"model": "digits", "id": request_id, "label": value}
    return await stack.http.post(f"{stack.gateway_url}/v1/feedback", json=body, headers=headers)


async def test_feedback_is_bound_to_the_key_that_asked_and_sent_to_its_edge(
    tmp_path: Path, nats_server: NatsServer, signed_v1: SignedArtifacts
) -> None:
    secret = tmp_path / "feedback.secret"
    write_secret(secret, "0123456789abcdef0123456789abcdef")
    gateway = {"api_keys": KEYS, "feedback_secret_file": secret}
    x = get_spec("digits").dataset()[0][:2].astype(np.float32)
    async with running_stack(
        tmp_path,
        nats_server,
        signed_v1,
        gateway=gateway,
        headers=auth(ADMIN),
        capture_rate=1.0,
        spool_capacity=100,
        min_new_labels=100000,
    ) as stack:
        a = await infer(stack, ALICE, x[0], "shared")
        b = await infer(stack, BOB, x[1], "shared")  # the same id from another key
        await infer(stack, ALICE, x[0], "alice-only")
        assert a.headers["x-fedgate-edge"] == "edge-1"
        token_a, token_b = a.headers[TOKEN_HEADER], b.headers[TOKEN_HEADER]
        assert token_a != token_b
        await asyncio.sleep(0.3)  # the capture writer flushes every 50 ms
        spool = stack.runtime.learning.spools["digits"]
        assert spool.stats().samples == 3  # bob's request did not replace alice's sample

        # bob cannot label alice's request: the same 404 as an id nobody served
        stolen = await label(stack, BOB, "alice-only", 3, token_b)
        unknown = await label(stack, BOB, "never-served", 3, token_b)
        assert stolen.status_code == unknown.status_code == 404, stolen.text
        assert (await label(stack, BOB, "alice-only", 3)).status_code == 404  # no token
        assert (await label(stack, BOB, "alice-only", 3, token_a)).status_code == 404
        assert spool.stats().labelled == 0

        # each key labels its own "shared"; with the token the edge answers at once
        started = time.perf_counter()
        own = await label(stack, ALICE, "shared", 7, token_a)
        took = time.perf_counter() - started
        assert own.status_code == 200 and own.json()["edge"] == "edge-1", own.text
        assert (await label(stack, BOB, "shared", 2, token_b)).status_code == 200
        data = spool.labelled(get_spec("digits"), 0.0)
        got = {
            int(y): row.tobytes()
            for row, y in zip(data.x_train["pixels"], data.y_train, strict=True)
        }
        assert got == {7: x[0].tobytes(), 2: x[1].tobytes()}
        assert took < 5.0  # generous on a loaded machine; the benchmark measures it
