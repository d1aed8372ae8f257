"""Fuzzed inference requests through the real gateway to real tritonserver edges.

Hypothesis generates requests around the valid one (shapes with huge, zero and negative
dimensions, every datatype and some that are none, data of the wrong length or kind,
binary tensors whose sizes and payloads disagree, outputs and parameters) and framing
around them (``Inference-Header-Content-Length`` right, wrong, repeated or of thousands of
digits; ``Content-Encoding`` gzip, deflate, unknown or repeated; ``Content-Type``
repeated; Content-Length (the fast path) or chunked (the ASGI entrance)). The property:
the gateway never answers 5xx while the edges are healthy, and after the corpus each edge
is the same tritonserver process (same PID, never restarted) and still serves.

The example count is bounded so that the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from gateway.validate import DTYPE_SIZES
from tests.conftest import SignedArtifacts, processes_mentioning
from tests.gateway_harness import GatewayStack, start_stack
from tests.raw_http import raw_request

pytestmark = pytest.mark.slow

EXAMPLES = 150
PATHS = [
    "/v2/models/digits/infer",
    "/v2/models/digits/versions/1/infer",
    "/v2/models/digits/versions/2/infer",
]
HUGE = [2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]
DIMS = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, *HUGE]), st.integers(-2, 70))
SHAPES = st.one_of(
    st.just([1, 64]),
    st.builds(lambda batch: [batch, 64], DIMS),
    st.lists(DIMS, max_size=4),
    st.sampled_from([None, "1,64", [1.0, 64], [True, 64]]),
)
DATATYPES = st.one_of(
    st.just("FP32"),
    st.sampled_from(sorted(DTYPE_SIZES)),
    st.sampled_from(["FLOAT", "", "fp32", None, 4, ["FP32"]]),
)
VALUES = st.one_of(
    st.floats(width=32, allow_nan=False),
    st.integers(-(2**70), 2**70),
    st.sampled_from([True, None, "x", [], {}]),
)
CRASH = json.dumps(
    {"inputs": [{"name": "pixels", "shape": [2147483648, 64], "datatype": "FP32", "data": [1]}]}
).encode()
SIZES = st.one_of(st.integers(-5, 600), st.sampled_from([*HUGE, 1.5, "256", None]))


FAULTS = (
    "shape",
    "datatype",
    "name",
    "count",
    "values",
    "data",
    "size",
    "payload",
    "both",
    "neither",
    "shm",
    "outputs",
    "parameters",
    "id",
    "header-length",
    "header-length twice",
    "encoding",
    "encoding twice",
    "content-type twice",
)
"""What a request may get wrong; a few at a time, none for some requests."""
VARIANTS = ("binary", "nested", "batch", "gzip", "deflate", "chunked", "outputs", "two inputs")
"""Valid variations of the request."""


def elements(shape: Any) -> int:
    """The product of ``shape`` when it is a small, sound one, else a small count."""
    if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 4096 for d in shape):
        count = math.prod(shape)
        if count <= 4096:
            return count
    return 1


def tensor(draw: st.DrawFn, faults: set[str], variants: set[str]) -> tuple[dict[str, Any], bytes]:
    """One input tensor, and the binary payload that goes with it (maybe empty)."""
    shape: Any = [draw(st.integers(1, 64)) if "batch" in variants else 1, 64]
    if "shape" in faults:
        shape = draw(SHAPES)
    item: dict[str, Any] = {"name": "pixels", "shape": shape, "datatype": "FP32"}
    if "datatype" in faults:
        item["datatype"] = draw(DATATYPES)
    if "name" in faults:
        item["name"] = draw(st.sampled_from(["logits", "", 7, None, "pixels "]))
    count = elements(shape)
    if "count" in faults:
        count = draw(st.integers(0, 130))
    binary = "binary" in variants or "both" in faults
    payload = b""
    if not binary or "both" in faults:
        value = draw(VALUES) if "values" in faults else 0.5
        data: Any = [value] * count
        if "nested" in variants and count % 64 == 0 and count:
            data = [data[i : i + 64] for i in range(0, count, 64)]
        if "data" in faults:
            data = draw(st.sampled_from([0.5, "abc", {}, [[0.5], 0.5], None]))
        item["data"] = data
    if binary:
        size = draw(SIZES) if "size" in faults else 4 * count
        item["parameters"] = {"binary_data_size": size}
        length = size if isinstance(size, int) and 0 <= size <= 4096 else 0
        payload = b"\x3f" * (draw(st.integers(0, 600)) if "payload" in faults else length)
    if "neither" in faults:
        item.pop("data", None)
        item.pop("parameters", None)
    if "shm" in faults:
        item["parameters"] = {"shared_memory_region": "r", "shared_memory_byte_size": 256}
    return item, payload


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]], bytes, bool]:
    """(path, headers, body, chunked) of one fuzzed inference request."""
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=3))
    variants = draw(st.sets(st.sampled_from(VARIANTS), max_size=3))
    drawn = [tensor(draw, faults, variants)]
    if "two inputs" in variants:
        drawn.append(tensor(draw, faults, variants))  # the same input twice: a 400
    doc: dict[str, Any] = {"inputs": [item for item, _ in drawn]}
    if "outputs" in variants or "outputs" in faults:
        output: dict[str, Any] = {"name": "logits", "parameters": {"binary_data": True}}
        if "outputs" in faults:
            output["name"] = draw(st.sampled_from(["logits", "x", 3]))
            flag = draw(st.sampled_from([True, False, "yes", None, 0]))
            output["parameters"] = {"binary_data": flag, "classification": draw(DIMS)}
        doc["outputs"] = [output]
    if "parameters" in faults:
        doc["parameters"] = {"binary_data_output": draw(st.sampled_from([True, False, 1, None]))}
    if "id" in faults:
        doc["id"] = draw(st.sampled_from(["req-1", 5, "", "x" * 300, None]))
    header = json.dumps(doc).encode()
    payload = b"".join(p for _, p in drawn)
    body = header + payload
    headers: list[tuple[str, str]] = []
    right = str(len(header))
    if payload or "header-length" in faults:
        wrong = [right, str(len(header) + 1), "0", "-1", "9" * 5000, "0" * 30 + right]
        bad = "header-length" in faults
        headers.append(
            ("Inference-Header-Content-Length", draw(st.sampled_from(wrong)) if bad else right)
        )
    if "header-length twice" in faults:
        headers.append(("Inference-Header-Content-Length", right))
    encoding = None
    if "gzip" in variants:
        encoding, body = "gzip", gzip.compress(body)
    elif "deflate" in variants:
        encoding, body = "deflate", zlib.compress(body)
    if "encoding" in faults:
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "gzip, identity", ""]))
    if encoding is not None:
        headers.append(("Content-Encoding", encoding))
    if "encoding twice" in faults:
        headers.append(("Content-Encoding", "identity"))
    headers.append(("Content-Type", "application/json"))
    if "content-type twice" in faults:
        headers.append(("Content-Type", "application/octet-stream"))
    return draw(st.sampled_from(PATHS)), headers, body, "chunked" in variants


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("gateway-fuzz")
    running = start_stack(root, signed_v1)
    yield running
    running.stop()
    assert processes_mentioning(str(root)) == []


def test_fuzzed_requests_get_no_5xx_and_leave_the_edges_running(stack: GatewayStack) -> None:
    pids = {edge_id: triton.process.pid for edge_id, triton in stack.edges.items()}
    auth = ("Authorization", f"Bearer {stack.keys['infer']}")
    statuses: dict[int, int] = {}
    failures: list[str] = []

    @given(request=requests())
    @example(request=(PATHS[0], [], CRASH, False))  # issue #16: killed the edge's Triton
    @example(request=(PATHS[0], [], CRASH, True))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def send(request: tuple[str, list[tuple[str, str]], bytes, bool]) -> None:
        path, headers, body, chunked = request
        status, answer = raw_request(stack.url, path, [auth, *headers], body, chunked=chunked)
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500:
            failures.append(f"{status} {answer[:200]!r} <- {path} {headers} {body[:300]!r}")

    send()
    assert failures == [], "\n".join(failures[:5])
    assert sum(statuses.values()) >= EXAMPLES // 2 and statuses.get(200, 0) > 0, statuses
    assert {e: t.process.pid for e, t in stack.edges.items()} == pids
    for edge_id, triton in stack.edges.items():
        assert triton.process.exited() is None, edge_id
    good = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    )
    for path in PATHS:
        status, answer = raw_request(stack.url, path, [auth], good.encode())
        assert status == 200, answer
    assert "Traceback" not in (stack.root / "gateway.log").read_text()
