"""The gateway against real tritonservers, driven by the official ``tritonclient``.

edge-1 serves ``digits`` version 1, edge-2 version 2; ``python -m gateway`` routes between
them with API keys on. Covers OIP v2 (health, metadata, JSON and binary inference,
versions), checks of malformed requests, keys and roles, the traffic split, retries,
ejection and re-admission, metrics, and HTTP/1.1 corner cases of the fast path.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from fedcore.models import get_spec
from fedcore.params import load_flat
from fedcore.process import free_port
from tests.conftest import SignedArtifacts, processes_mentioning
from tests.gateway_harness import GatewayStack, start_stack

INFER = "/v2/models/digits/infer"
V1 = "/v2/models/digits/versions/1"
ROW = [0.25] * 64


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, signed_v1: SignedArtifacts
) -> Iterator[GatewayStack]:
    root = tmp_path_factory.mktemp("gateway")
    running = start_stack(root, signed_v1)
    yield running
    running.stop()
    assert processes_mentioning(str(root)) == []


def logits(signed: SignedArtifacts, version: int, x: np.ndarray) -> np.ndarray:
    module = get_spec("digits").build_module()
    load_flat(module, (signed.params * (1.0 if version == 1 else 0.5)).astype("float32"))
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def digits(n: int) -> np.ndarray:
    _, _, x, _ = get_spec("digits").dataset()
    return np.ascontiguousarray(x[:n])


def json_infer(data: list[float] | None = None, **extra: object) -> bytes:
    tensor = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": data or ROW}
    return json.dumps({"inputs": [tensor], **extra}).encode()


# -- the official clients -----------------------------------------------------------------


def test_tritonclient_health_metadata_and_inference(
    stack: GatewayStack, signed_v1: SignedArtifacts
) -> None:
    client = httpclient.InferenceServerClient(stack.url.removeprefix("http://"))
    h = stack.auth()
    try:
        assert client.is_server_live() and client.is_server_ready()  # open to probes
        assert client.get_server_metadata(headers=h)["extensions"] == ["binary_tensor_data"]
        assert client.is_model_ready("digits", headers=h)
        assert client.is_model_ready("digits", "1", h) and client.is_model_ready("digits", "2", h)
        assert not client.is_model_ready("digits", "3", h)
        meta = client.get_model_metadata("digits", "1", headers=h)
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["versions"] == ["1"]
        x = digits(16)
        for version in ("", "1", "2"):
            expected = logits(signed_v1, int(version or 2), x)
            for binary in (False, True):
                inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                out = httpclient.InferRequestedOutput("logits", binary_data=binary)
                result = client.infer(
                    "digits",
                    [inp],
                    version,
                    [out],
                    request_id=f"r{version}{binary}",
                    headers=stack.auth(),  # a fresh dict: tritonclient writes into it
                )
                response = result.get_response()
                assert response["id"] == f"r{version}{binary}"
                assert response["model_version"] == (version or "2")
                np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
        inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        zipped = client.infer(
            "digits",
            [inp],
            "1",
            headers=stack.auth(),
            request_compression_algorithm="gzip",
            response_compression_algorithm="gzip",
        )
        np.testing.assert_allclose(zipped.as_numpy("logits"), logits(signed_v1, 1, x), atol=1e-4)
        with pytest.raises(InferenceServerException, match="unknown API key"):
            client.infer("digits", [inp], headers={"Authorization": "Bearer fgk_wrong"})
    finally:
        client.close()


async def test_asyncio_client(stack: GatewayStack, signed_v1: SignedArtifacts) -> None:
    client = aioclient.InferenceServerClient(stack.url.removeprefix("http://"))
    h = stack.auth()
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("digits", "2", h)
        meta = await client.get_model_metadata("digits", headers=h)
        assert meta["outputs"][0]["name"] == "logits"
        x = digits(8)
        for version, binary in (("1", True), ("2", False), ("", True)):
            inp = aioclient.InferInput("pixels", [8, 64], "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = aioclient.InferRequestedOutput("logits", binary_data=binary)
            result = await client.infer(
                "digits", [inp], version, [out], request_id="aio", headers=stack.auth()
            )
            assert result.get_response()["id"] == "aio"
            expected = logits(signed_v1, int(version or 2), x)
            np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    finally:
        await client.close()


def test_binary_data_output_and_headers_name_edge_and_version(stack: GatewayStack) -> None:
    body = json_infer(id="bdo", parameters={"binary_data_output": True})
    status, headers, data = stack.request("POST", f"{V1}/infer", body)
    assert status == 200
    assert (headers["x-fedgate-edge"], headers["x-fedgate-model-version"]) == ("edge-1", "1")
    size = int(headers["inference-header-content-length"])
    header = json.loads(data[:size])
    assert header["id"] == "bdo" and header["outputs"][0]["parameters"]["binary_data_size"] == 40
    assert len(data) == size + 40


# -- checks of bad requests ------------------------------------------------------------


def binary(declared: int, payload: int, header_length: int | None = None) -> tuple[bytes, str]:
    tensor = {
        "name": "pixels",
        "shape": [1, 64],
        "datatype": "FP32",
        "parameters": {"binary_data_size": declared},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    length = len(header) if header_length is None else header_length
    return header + struct.pack(f"<{payload // 4}f", *([0.5] * (payload // 4))), str(length)


def swap(old: bytes, new: bytes) -> bytes:
    return json_infer().replace(old, new)


BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [}', None, 400, "malformed request JSON"),
    ("empty body", b"", None, 400, "malformed request JSON"),
    ("not an object", b"[1, 2]", None, 400, "must be a JSON object"),
    ("no inputs", b"{}", None, 400, "'inputs' must be a non-empty list"),
    (
        "wrong datatype",
        swap(b"FP32", b"INT32"),
        None,
        400,
        "'pixels': datatype INT32 does not match the model's FP32",
    ),
    ("unknown datatype", swap(b"FP32", b"FLOAT"), None, 400, "'pixels': unknown datatype 'FLOAT'"),
    (
        "wrong shape",
        swap(b"[1, 64]", b"[1, 32]"),
        None,
        400,
        "'pixels': shape [1, 32] does not match the model's [-1, 64]",
    ),
    ("wrong rank", swap(b"[1, 64]", b"[1, 8, 8]"), None, 400, "shape [1, 8, 8] does not match"),
    (
        "too few elements",
        json_infer(ROW[:10]),
        None,
        400,
        "'pixels': 'data' has 10 elements, but shape [1, 64] needs 64",
    ),
    ("too many elements", json_infer(ROW * 2), None, 400, "'data' has 128 elements"),
    ("strings for FP32", json_infer(["a"] * 64), None, 400, "element 0 ('a') is not a number"),
    ("unknown input", swap(b'"pixels"', b'"pix"'), None, 400, "unknown input 'pix' for model"),
    ("unknown output", json_infer(outputs=[{"name": "p"}]), None, 400, "unknown output 'p' for"),
    ("request id not a string", json_infer(id=7), None, 400, "request 'id' must be a string"),
    (
        "batch too large",
        json_infer(ROW * 65).replace(b"[1, 64]", b"[65, 64]"),
        None,
        400,
        "batch-size must be <= 64",
    ),
    (
        "binary size vs shape",
        *binary(128, 128),
        400,
        "'pixels': binary_data_size is 128 bytes, but shape [1, 64] of FP32 needs 256",
    ),
    (
        "binary payload short",
        *binary(256, 128),
        400,
        "binary tensor data is 128 bytes after the JSON header",
    ),
    ("binary payload long", *binary(256, 260), 400, "binary tensor data is 260 bytes"),
    (
        "binary size negative",
        *binary(-4, 256),
        400,
        "'pixels': binary_data_size must be a non-negative integer",
    ),
    (
        "header length past body",
        *binary(256, 256, 99999),
        400,
        "Inference-Header-Content-Length 99999 is outside the body",
    ),
    (
        "header length not a number",
        binary(256, 256)[0],
        "abc",
        400,
        "Inference-Header-Content-Length must be a byte count",
    ),
    (
        "header length cuts the JSON",
        *binary(256, 256, 20),
        400,
        "malformed request JSON in the first 20 bytes",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_clear_4xx(
    stack: GatewayStack, body: bytes, header_length: str | None, status: int, message: str
) -> None:
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Inference-Header-Content-Length": header_length}
    for path in (f"{V1}/infer", INFER):
        got, response_headers, data = stack.request("POST", path, body, headers)
        assert got == status, data
        assert response_headers["content-type"] == "application/json"
        error = json.loads(data)["error"]
        assert message in error, error


def test_bad_targets_bodies_and_encodings(stack: GatewayStack) -> None:
    gz = {"Content-Encoding": "gzip"}
    cases = [
        ("/v2/models/cats/infer", json_infer(), {}, 404, "'cats' is not found"),
        ("/v2/models/digits/versions/9/infer", json_infer(), {}, 404, "version 9 is not found"),
        ("/v2/models/digits/versions/x/infer", json_infer(), {}, 404, "not a positive integer"),
        (INFER, b"x" * (1024 * 1024 + 1), {}, 413, "exceeds the limit of 1048576"),
        (INFER, b"not gzip", gz, 400, "not valid gzip"),
        (INFER, gzip.compress(b'{"inputs": 5}'), gz, 400, "'inputs' must be"),
        (INFER, b'{"inputs": ' + b"[" * 1_000_000, {}, 400, "nested more than 64 levels"),
        (INFER, gzip.compress(b"[" * 1_000_000), gz, 400, "nested more than 64 levels"),
    ]
    for path, body, headers, status, message in cases:
        got, _, data = stack.request("POST", path, body, headers)
        assert got == status, (path, data)
        assert message in json.loads(data)["error"]
    got, _, data = stack.request("GET", INFER)
    assert got == 404 and json.loads(data)["error"] == "Not Found"
    assert stack.gateway.exited() is None, "the gateway must survive every bad request"
    for triton in stack.edges.values():  # a million brackets crash Triton 2.51: none got there
        assert triton.live()
    assert "Traceback" not in (stack.root / "gateway.log").read_text()


# -- keys, roles, rate limit ---------------------------------------------------------------


def test_keys_roles_and_rate_limit(stack: GatewayStack) -> None:
    status, headers, data = stack.request("POST", INFER, json_infer(), key=None)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert "missing API key" in json.loads(data)["error"]
    assert stack.request("GET", "/v2", key=None)[0] == 401
    assert stack.request("GET", "/metrics", key=None)[0] == 401
    assert stack.request("GET", "/v2/health/ready", key=None)[0] == 200
    split = json.dumps({"stable": 1}).encode()
    status, _, data = stack.request("PUT", "/v1/models/digits/routing", split)
    assert status == 403 and "needs 'admin'" in json.loads(data)["error"]
    assert stack.request("GET", "/v1/models/digits/routing")[0] == 200
    statuses = [stack.request("POST", INFER, json_infer(), key="slow") for _ in range(3)]
    assert [s[0] for s in statuses] == [200, 200, 429]
    assert statuses[2][1]["retry-after"] == "1"
    assert "rate limit of 1 requests/s exceeded for API key 'slow'" in statuses[2][2].decode()


# -- routing --------------------------------------------------------------------------------


def test_version_routing_and_traffic_split(stack: GatewayStack) -> None:
    def served(n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            status, headers, body = stack.request("POST", INFER, json_infer())
            assert status == 200
            assert json.loads(body)["model_version"] == headers["x-fedgate-model-version"]
            out.append((headers["x-fedgate-model-version"], headers["x-fedgate-edge"]))
        return out

    assert set(served(4)) == {("2", "edge-2")}  # no split: the newest version
    path = "/v1/models/digits/routing"
    split = {"stable": 1, "candidate": 2, "candidate_weight": 0.5}
    status, _, body = stack.request("PUT", path, json.dumps(split).encode(), key="admin")
    assert status == 200 and json.loads(body)["split"] == split
    try:
        assert set(served(40)) == {("1", "edge-1"), ("2", "edge-2")}
        split["candidate_weight"] = 0.0
        stack.request("PUT", path, json.dumps(split).encode(), key="admin")
        assert set(served(10)) == {("1", "edge-1")}
        view = json.loads(stack.request("GET", path)[2])
        assert view["served_versions"] == [1, 2] and view["split"]["stable"] == 1
        bad = json.dumps({"stable": 1, "candidate_weight": 0.5}).encode()
        status, _, body = stack.request("PUT", path, bad, key="admin")
        assert status == 400 and "needs a candidate" in json.loads(body)["error"]
    finally:
        assert stack.request("DELETE", path, key="admin")[0] == 204
    assert set(served(3)) == {("2", "edge-2")}


class _FlakyEdge(BaseHTTPRequestHandler):
    """Ready to probes, 503 to inference: an edge that keeps failing."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"error":"model unavailable"}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def metric(stack: GatewayStack, line_start: str) -> float:
    text = stack.request("GET", "/metrics")[2].decode()
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start)]
    return sum(values)


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise TimeoutError("condition not met")


def test_retry_ejection_and_readmission(stack: GatewayStack) -> None:
    port = free_port()
    stack.heartbeats.edges["edge-9"] = (f"http://127.0.0.1:{port}", [1])
    stack.wait_for_edges({"edge-1", "edge-2", "edge-9"})
    v1 = f"{V1}/infer"
    try:
        for _ in range(3):  # edge-9 refuses connections: each request retried on edge-1
            status, headers, _ = stack.request("POST", v1, json_infer())
            assert status == 200 and headers["x-fedgate-edge"] == "edge-1"
        assert stack.edges_view()["edge-9"]["ejected"]
        assert metric(stack, 'fedgate_gateway_retries_total{model="digits",reason="connect"}') >= 3
        assert metric(stack, 'fedgate_gateway_edge_ejections_total{edge="edge-9"}') == 1
        server = ThreadingHTTPServer(("127.0.0.1", port), _FlakyEdge)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:  # healthy to the probe: re-admitted, then its 503s are retried and eject it again
            wait_for(lambda: not stack.edges_view()["edge-9"]["ejected"])
            assert metric(stack, 'fedgate_gateway_edge_readmissions_total{edge="edge-9"}') == 1
            for _ in range(3):
                status, headers, _ = stack.request("POST", v1, json_infer())
                assert status == 200 and headers["x-fedgate-edge"] == "edge-1"
            assert metric(stack, 'fedgate_gateway_retries_total{model="digits",reason="503"}') >= 1
            wait_for(lambda: stack.edges_view()["edge-9"]["ejected"])
        finally:
            server.shutdown()
            server.server_close()
    finally:
        stack.heartbeats.leave("edge-9")
    stack.wait_for_edges({"edge-1", "edge-2"})


def test_metrics_count_requests_latency_and_inflight(stack: GatewayStack) -> None:
    served = 'fedgate_gateway_requests_total{edge="edge-1",model="digits",status="%s",version="1"}'
    before = metric(stack, served % 200)
    for _ in range(3):
        stack.request("POST", f"{V1}/infer", json_infer())
    stack.request("POST", f"{V1}/infer", b"{")
    text = stack.request("GET", "/metrics")[2].decode()
    assert metric(stack, served % 200) - before == 3
    assert served % 400 in text
    bucket = "fedgate_gateway_request_duration_seconds_bucket"
    assert f'{bucket}{{le="0.005",model="digits",version="1"}}' in text
    assert 'fedgate_gateway_inflight_requests{model="digits"} 0.0' in text
    unknown = 'fedgate_gateway_requests_total{edge="",model="<unknown>",status="404",version=""}'
    assert unknown in text
    assert 'fedgate_gateway_denied_total{reason="unauthorized"}' in text
    assert 'fedgate_gateway_edges{state="admitted"} 2.0' in text


# -- HTTP/1.1 corner cases of the fast path --------------------------------------------------


def raw_exchange(stack: GatewayStack, payload: bytes, responses: int) -> list[tuple[int, bytes]]:
    """Send raw bytes on one connection, read ``responses`` answers (status, body)."""
    host, port = stack.url.removeprefix("http://").split(":")
    out: list[tuple[int, bytes]] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        buf = b""
        while len(out) < responses:
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, buf = buf.split(b"\r\n\r\n", 1)
            status = int(head.split(b" ")[1])
            if status == 100:
                out.append((100, b""))
                continue
            length = int(next(v for k, v in _headers(head) if k == b"content-length").decode())
            while len(buf) < length:
                buf += sock.recv(65536)
            out.append((status, buf[:length]))
            buf = buf[length:]
    return out


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, v in (ln.split(b":", 1) for ln in lines)]


def http_request(stack: GatewayStack, path: str, body: bytes, rid: str, **extra: str) -> bytes:
    headers = {"Host": "gw", "Authorization": f"Bearer {stack.keys['infer']}", **extra}
    if "Transfer-Encoding" not in headers:
        headers["Content-Length"] = str(len(body))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def test_pipelined_requests_answer_in_order(stack: GatewayStack) -> None:
    first = http_request(stack, INFER, json_infer(id="first"), "first")
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\n\r\n"
    second = http_request(stack, f"{V1}/infer", json_infer(id="second"), "s")
    answers = raw_exchange(stack, first + live + second, 3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert json.loads(answers[0][1])["id"] == "first" and answers[1][1] == b""
    assert json.loads(answers[2][1])["id"] == "second"


def test_expect_continue_and_chunked_uploads(stack: GatewayStack) -> None:
    body = json_infer(id="chunked")
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    request = http_request(stack, INFER, chunked, "c", **{"Transfer-Encoding": "chunked"})
    [(status, data)] = raw_exchange(stack, request, 1)
    assert status == 200 and json.loads(data)["id"] == "chunked"
    body = json_infer(id="expect")
    request = http_request(stack, INFER, b"", "e", Expect="100-continue")
    request = request.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    answers = raw_exchange(stack, request + body, 2)
    assert answers[0][0] in (100, 200)
    assert json.loads(answers[-1][1])["id"] == "expect"


def test_fleet_and_openapi(stack: GatewayStack) -> None:
    edges = stack.edges_view()
    assert edges["edge-1"]["models"]["digits"]["ready"] == [1]
    assert edges["edge-2"]["models"]["digits"]["ready"] == [2]
    assert not edges["edge-1"]["ejected"]
    paths = json.loads(stack.request("GET", "/openapi.json", key=None)[2])["paths"]
    assert "/v2/models/{model}/versions/{version}/infer" in paths


def test_zz_gateway_stops_cleanly(stack: GatewayStack) -> None:
    started = time.monotonic()
    code = stack.gateway.stop(timeout=15)
    assert code in (0, -15)  # uvicorn re-raises the SIGTERM it handled, after draining
    assert time.monotonic() - started < 10
    log = (stack.root / "gateway.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
