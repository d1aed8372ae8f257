"""Hostile input against a live gateway in front of real tritonservers.

- end-to-end hostile bodies: 100k-level nested JSON (arrays, objects, inside a binary
  request's JSON header, and to the FastAPI routes), a 20 MB body, a gzip bomb, truncated
  binary tensors, a lying ``Inference-Header-Content-Length``, invalid UTF-8: each gets a
  4xx with a message, never a 5xx, and the gateway and its edges stay up;
- roles: without a key every route but health and the API document is 401, and an
  ``infer`` key gets 403 from every admin route (the list comes from ``/openapi.json``,
  so a new state-changing route must be declared here);
- schemathesis against ``/openapi.json`` with the infer and the admin key: no 5xx, and
  every response matches the documented status codes, content types and schemas.

``tests/test_gateway_oip.py`` has the ordinary bad requests (wrong shape, datatype, counts,
unknown model/version, 413 at the limit, bad gzip) and the key/role/rate-limit basics.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup

from tests.conftest import SignedArtifacts, processes_mentioning
from tests.gateway_harness import GatewayStack, start_stack

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
V1 = "/v2/models/digits/versions/1"
ROW = ",".join(["0.5"] * 64)
GOOD = f'{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[{ROW}]}}]}}'
DEEP = 100_000
EXAMPLES = {"infer": 10, "admin": 6}
"""Generated requests per operation and mode (valid, invalid) for schemathesis, per key."""


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("hostile-gateway")
    running = start_stack(root, signed_v1)
    yield running
    running.stop()
    assert processes_mentioning(str(root)) == []


def alive(stack: GatewayStack) -> None:
    """Gateway and both edges still up and serving; no traceback in the gateway's log."""
    assert stack.gateway.exited() is None
    for edge_id, triton in stack.edges.items():
        assert triton.process.exited() is None, edge_id
    status, _, body = stack.request("POST", INFER, GOOD.encode(), {})
    assert status == 200, body
    assert "Traceback" not in (stack.root / "gateway.log").read_text()


def binary_body(header: bytes, payload: bytes) -> tuple[bytes, dict[str, str]]:
    return header + payload, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def binary_header(size: int, **extra: Any) -> bytes:
    tensor = {
        "name": "pixels",
        "shape": [1, 64],
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }
    return json.dumps({"inputs": [tensor], **extra}).encode()


HOSTILE_INFER: list[tuple[str, bytes, dict[str, str], int]] = [
    ("100k nested arrays", b'{"inputs":' + b"[" * DEEP + b"]" * DEEP + b"}", {}, 400),
    ("100k nested objects", b'{"a":' * DEEP + b"1" + b"}" * DEEP, {}, 400),
    ("100k unclosed brackets", b"[" * DEEP, {}, 400),
    (
        "100k nesting in the binary JSON header",
        *binary_body(b'{"inputs":' + b"[" * DEEP + b"]" * DEEP + b"}", b"\0" * 256),
        400,
    ),
    ("truncated binary tensor", *binary_body(binary_header(256), b"\0" * 100), 400),
    ("binary tensor longer than declared", *binary_body(binary_header(256), b"\0" * 300), 400),
    (
        "header length past the body",
        binary_header(256) + b"\0" * 256,
        {"Inference-Header-Content-Length": "999999"},
        400,
    ),
    (
        "header length zero",
        binary_header(256) + b"\0" * 256,
        {"Inference-Header-Content-Length": "0"},
        400,
    ),
    (
        "header length negative",
        binary_header(256) + b"\0" * 256,
        {"Inference-Header-Content-Length": "-5"},
        400,
    ),
    (
        "header length of 30 digits",
        binary_header(256) + b"\0" * 256,
        {"Inference-Header-Content-Length": "9" * 30},
        400,
    ),
    (
        "header length cutting a UTF-8 character",
        '{"id":"\u00e9\u00e9"}'.encode(),
        {"Inference-Header-Content-Length": "8"},
        400,
    ),
    (
        "datatype that is a list (found by fuzzing the explainer)",
        GOOD.replace('"FP32"', "[]").encode(),
        {},
        400,
    ),
    ("invalid UTF-8 in JSON", b'{"inputs":[{"name":"\xff\xfe"}]}', {}, 400),
    # Triton parses NaN and Infinity literals (not JSON): a NaN pixel gives NaN logits
    ("NaN literal", GOOD.replace("0.5", "NaN", 1).encode(), {}, 200),
    ("JSON that is a bare number", b"1e999999", {}, 400),
    ("20 MB body", b"[" + b"0," * (10 * 1024 * 1024) + b"0]", {}, 413),
    (
        "gzip bomb (200 MB of zeros)",
        gzip.compress(b"\0" * (200 * 1024 * 1024), compresslevel=9),
        {"Content-Encoding": "gzip"},
        400,
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [case[1:] for case in HOSTILE_INFER],
    ids=[case[0] for case in HOSTILE_INFER],
)
def test_hostile_infer_bodies_get_a_4xx(
    stack: GatewayStack, body: bytes, headers: dict[str, str], status: int
) -> None:
    for path in (INFER, f"{V1}/infer"):
        got, response_headers, data = stack.request("POST", path, body, headers)
        assert got == status, (path, data[:300])
        assert response_headers["content-type"] == "application/json"
        assert status == 200 or json.loads(data)["error"], data
    alive(stack)


HOSTILE_ROUTES = [
    ("POST", "/v1/feedback", "infer"),
    ("PUT", "/v1/models/digits/routing", "admin"),
    ("POST", "/v1/models/digits/rollouts", "admin"),
]


@pytest.mark.parametrize(("method", "path", "key"), HOSTILE_ROUTES)
@pytest.mark.parametrize(
    "body",
    [
        b'{"a":' * DEEP + b"1" + b"}" * DEEP,
        b"[" * DEEP + b"]" * DEEP,
        b"{" + b'"k":1,' * 150_000 + b'"k":1}',
        b"\xff\xfe\x00",
        b'{"model": "digits", "id": "x", "label": 1e999999}',
    ],
    ids=["deep objects", "deep arrays", "150k keys", "not UTF-8", "huge exponent"],
)
def test_hostile_bodies_to_the_api_routes_get_a_4xx(
    stack: GatewayStack, method: str, path: str, key: str, body: bytes
) -> None:
    headers = {"Content-Type": "application/json"}
    got, _, data = stack.request(method, path, body, headers, key=key)
    assert 400 <= got < 500, (got, data[:300])
    alive(stack)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("key", [None, "infer"], ids=["no key", "infer key"])
def test_a_20_mb_body_to_an_api_route_is_refused_without_reading_it(
    stack: GatewayStack, chunked: bool, key: str | None
) -> None:
    """FastAPI reads a body before it checks the key: the gateway's API routes have a
    limit of their own, answered as soon as it is passed (before the body is all in)."""
    host, port = stack.url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {stack.keys[key]}\r\n" if key else ""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {20 << 20}"
    head = f"POST /v1/feedback HTTP/1.1\r\nHost: gw\r\n{auth}{framing}\r\n\r\n".encode()
    piece = b"[" * 65536
    if chunked:
        piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed after 413
            sock.sendall(head)
            for _ in range(32 if chunked else 1):  # 2 MiB chunked: over the 1 MiB limit
                sock.sendall(piece)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status == 413, answer[:300]
    assert b"exceeds the limit of 1048576 for API routes" in answer
    alive(stack)


# -- schemathesis --------------------------------------------------------------------------


def summary(exc: BaseException) -> str:
    """The failed checks' titles and the request that failed them."""
    if isinstance(exc, FailureGroup):
        titles = sorted({f.title for f in exc.exceptions if isinstance(f, Failure)})
        text = str(exc)
        status = re.search(r"\[(\d{3})\]", text)
        curl = re.search(r"curl [^\n]+", text)
        return f"{titles} {status.group(1) if status else '?'} {curl.group(0) if curl else ''}"[
            :600
        ]
    return repr(exc)[:800]


def fuzz_api(stack: GatewayStack, key: str, examples: int) -> dict[str, list[str]]:
    """Every operation of ``/openapi.json``, ``examples`` valid and ``examples`` invalid
    generated requests each, sent with ``key``; failures by operation."""
    # Query parameters the schema does not name are ignored, as HTTP APIs do: not a
    # "schema-violating request" to refuse.
    config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
    loaded = schemathesis.openapi.from_url(f"{stack.url}/openapi.json", config=config, timeout=10)
    failures: dict[str, list[str]] = {}
    for result in loaded.get_all_operations():
        operation = result.ok()
        found = fuzz_operation(operation, stack.url, stack.auth(key), examples)
        if found:
            failures[operation.label] = found
    return failures


def fuzz_operation(
    operation: schemathesis.APIOperation, url: str, auth: dict[str, str], examples: int
) -> list[str]:
    failures: list[str] = []
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=strategy)
    @settings(
        max_examples=2 * examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        database=None,
    )
    def run(case: schemathesis.Case) -> None:
        try:
            case.call_and_validate(
                base_url=url,
                headers=auth,
                timeout=30,
                # the routes check more than the schema can say (a label below the model's
                # class count, a model fedgate has): valid-looking data may get a
                # documented 4xx
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )
        except (FailureGroup, Exception) as exc:  # failed checks, or the request failed
            failures.append(summary(exc))

    run()
    return failures


@pytest.mark.parametrize("key", ["infer", "admin"])
def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(
    stack: GatewayStack, key: str
) -> None:
    failures = fuzz_api(stack, key, EXAMPLES[key])
    compact = {op: sorted({f.split(" curl")[0] for f in fs}) for op, fs in failures.items()}
    examples = {op: fs[0] for op, fs in failures.items()}
    assert failures == {}, json.dumps(compact, indent=1) + json.dumps(examples, indent=1)
    alive(stack)
