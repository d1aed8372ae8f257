"""The gateway's pre-forward check against a real gateway in front of real tritonservers.

Issue #16's data-plane findings, each reproduced on the code before the check:

- an absurd shape (``[2147483648, 64]`` with one element) made the edge's tritonserver
  die with SIGSEGV: the gateway forwarded first and explained afterwards;
- repeated framing headers (two ``Content-Encoding``, two
  ``Inference-Header-Content-Length``): the gateway judged the last copy and forwarded all
  of them, Triton reads the first;
- the fast path buffered a body of up to ``MAX_BODY_BYTES`` before it checked the key;
- an ``Inference-Header-Content-Length`` of 5,000 digits was a 500 (``int()``'s limit).

``tests/test_gateway_hostile_fuzz.py`` fuzzes the same check with generated requests.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import SignedArtifacts, processes_mentioning
from tests.gateway_harness import GatewayStack, start_stack
from tests.raw_http import raw_request

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
ROW = [0.5] * 64


def infer_doc(shape: list[int], data: list[float], **tensor: object) -> bytes:
    item = {"name": "pixels", "shape": shape, "datatype": "FP32", "data": data, **tensor}
    return json.dumps({"inputs": [item]}).encode()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("gateway-guard")
    running = start_stack(root, signed_v1)
    yield running
    running.stop()
    assert processes_mentioning(str(root)) == []


def edge_pids(stack: GatewayStack) -> dict[str, int | None]:
    return {edge_id: t.process.pid for edge_id, t in stack.edges.items()}


def still_serving(stack: GatewayStack, pids: dict[str, int | None]) -> None:
    """Same tritonserver processes as before, alive, and a good request still served."""
    assert edge_pids(stack) == pids
    for edge_id, triton in stack.edges.items():
        assert triton.process.exited() is None, edge_id
    status, _, body = stack.request("POST", INFER, infer_doc([1, 64], ROW), {})
    assert status == 200, body
    assert "Traceback" not in (stack.root / "gateway.log").read_text()


def raw(
    stack: GatewayStack, headers: list[tuple[str, str]], body: bytes, chunked: bool = False
) -> tuple[int, bytes]:
    return raw_request(stack.url, INFER, headers, body, chunked=chunked)


def keyed(stack: GatewayStack, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {stack.keys['infer']}"), *extra]


@pytest.mark.parametrize(
    ("shape", "data", "named"),
    [
        ([2147483648, 64], [0.5], "shape"),
        ([1, 2147483648], [0.5], "shape"),
        ([2**62, 2**62], [0.5], "shape"),
        ([65, 64], ROW * 65, "max_batch_size"),
        ([1, 64], ROW[:63], "elements"),
        ([64], ROW, "shape"),
    ],
    ids=["huge batch", "huge fixed dim", "overflowing product", "batch over max", "short", "rank"],
)
def test_bad_shapes_are_refused_before_they_reach_the_edge(
    stack: GatewayStack, shape: list[int], data: list[float], named: str
) -> None:
    pids = edge_pids(stack)
    status, _, body = stack.request("POST", INFER, infer_doc(shape, data), {})
    assert status == 400, body
    message = json.loads(body)["error"]
    assert "pixels" in message and named in message, message
    still_serving(stack, pids)


def test_binary_sizes_and_datatype_are_checked_before_forwarding(stack: GatewayStack) -> None:
    pids = edge_pids(stack)
    cases = [
        ({"shape": [2147483648, 64], "parameters": {"binary_data_size": 256}}, 256, "shape"),
        ({"shape": [1, 64], "parameters": {"binary_data_size": 8}}, 8, "binary_data_size"),
        (
            {"shape": [1, 64], "datatype": "FP64", "parameters": {"binary_data_size": 512}},
            512,
            "FP64",
        ),
    ]
    for tensor, size, named in cases:
        item = {"name": "pixels", "datatype": "FP32", **tensor}
        header = json.dumps({"inputs": [item]}).encode()
        status, _, body = stack.request(
            "POST",
            INFER,
            header + b"\0" * size,
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert status == 400, (tensor, body)
        assert named in json.loads(body)["error"], body
    still_serving(stack, pids)


def test_repeated_framing_headers_are_refused(stack: GatewayStack) -> None:
    pids = edge_pids(stack)
    good = infer_doc([1, 64], ROW)
    bomb = gzip.compress(b"[" * (8 << 20))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    cases = [
        (
            [("Content-Encoding", "gzip"), ("Content-Encoding", "identity")],
            bomb,
            "Content-Encoding",
        ),
        (
            [("Content-Encoding", "identity"), ("Content-Encoding", "identity")],
            good,
            "Content-Encoding",
        ),
        (
            [
                ("Inference-Header-Content-Length", "1"),
                ("Inference-Header-Content-Length", str(len(header))),
            ],
            header + b"\0" * 256,
            "Inference-Header-Content-Length",
        ),
        ([("Content-Type", "application/json")] * 2, good, "Content-Type"),
    ]
    for fast in (True, False):
        for headers, body, named in cases:  # chunked: the ASGI entrance
            status, answer = raw(stack, keyed(stack, *headers), body, chunked=not fast)
            assert status == 400, (fast, named, answer[:300])
            assert named in json.loads(answer)["error"], answer
    still_serving(stack, pids)


@pytest.mark.parametrize("entrance", ["fast path", "asgi"])
def test_the_key_is_checked_before_any_body_is_read(stack: GatewayStack, entrance: str) -> None:
    """Headers of a 900 kB request without a key, then nothing: a 401 comes at once."""
    host, port = stack.url.removeprefix("http://").split(":")
    framing = "Content-Length: 921600" if entrance == "fast path" else "Transfer-Encoding: chunked"
    head = f"POST {INFER} HTTP/1.1\r\nHost: gw\r\n{framing}\r\n\r\n".encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        if entrance == "asgi":
            sock.sendall(b"1000\r\n" + b"[" * 4096 + b"\r\n")  # one chunk, more to come
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    assert time.monotonic() - started < 8


def test_a_header_length_of_5000_digits_is_a_400(stack: GatewayStack) -> None:
    pids = edge_pids(stack)
    for digits in ("9" * 5000, "0" * 4999 + "1"):
        status, _, body = stack.request(
            "POST", INFER, infer_doc([1, 64], ROW), {"Inference-Header-Content-Length": digits}
        )
        assert status == 400, body
        assert "Inference-Header-Content-Length" in json.loads(body)["error"]
    still_serving(stack, pids)


def test_shared_memory_and_duplicate_keys_are_refused(stack: GatewayStack) -> None:
    pids = edge_pids(stack)
    shm = infer_doc([1, 64], ROW).replace(
        b'"data"',
        b'"parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 256}, "x"',
    )
    twice = (
        b'{"inputs":[{"name":"pixels","shape":[2147483648,64],"shape":[1,64],'
        b'"datatype":"FP32","data":' + json.dumps(ROW).encode() + b"}]}"
    )
    for body, named in ((shm, "shared memory"), (twice, "'shape'")):
        status, _, answer = stack.request("POST", INFER, body, {})
        assert status == 400, answer
        assert named in json.loads(answer)["error"], answer
    still_serving(stack, pids)
