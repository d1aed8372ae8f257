"""Gateway parts without processes: keys, rate limit, routing, ejection, request checks, metrics."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedcore.wire import Heartbeat, ModelState
from gateway.app import DEV_MODE_WARNING, create_app
from gateway.auth import KeyRing, Principal, RateLimiter, generate_key, hash_key, key_line, require
from gateway.dataplane import split_infer_path
from gateway.errors import Forbidden, NotFound, RateLimited, Unauthorized, Unavailable
from gateway.fleet import Fleet
from gateway.metrics import GatewayMetrics
from gateway.routing import Router, TrafficSplit, parse_version
from gateway.schemas import ModelSchema, TensorSchema
from gateway.settings import GatewaySettings
from gateway.validate import (
    check_depth,
    check_framing,
    decode_body,
    explain,
    is_triton_parse_error,
)

# -- keys and roles ---------------------------------------------------------------------


def test_key_lines_hold_only_the_hash_and_authenticate() -> None:
    admin, infer = generate_key(), generate_key()
    text = "\n".join(
        ["# keys", key_line("admin", "ops", admin), key_line("infer", "app", infer, 5.0), ""]
    )
    assert admin not in text and hash_key(admin) in text
    ring = KeyRing.parse(text, "keys")
    assert ring.authenticate(f"Bearer {admin}".encode()).role == "admin"
    app = ring.authenticate(f"bearer  {infer}".encode())
    assert (app.name, app.role, app.rate_per_s) == ("app", "infer", 5.0)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing API key"),
        (b"", "missing API key"),
        (b"Basic dXNlcjpwYXNz", "malformed Authorization header"),
        (b"Bearer", "malformed Authorization header"),
        (b"Bearer fgk_not-a-known-key", "unknown API key"),
    ],
)
def test_missing_or_wrong_keys_are_401(header: bytes | None, message: str) -> None:
    ring = KeyRing.parse(key_line("infer", "app", generate_key()), "keys")
    with pytest.raises(Unauthorized, match=message) as info:
        ring.authenticate(header)
    assert info.value.status == 401
    assert info.value.headers()["www-authenticate"].startswith("Bearer")


def test_roles_infer_cannot_do_admin() -> None:
    infer, admin = Principal("app", "infer"), Principal("ops", "admin")
    assert require(infer, "infer") is infer and require(admin, "infer") is admin
    assert require(admin, "admin") is admin
    with pytest.raises(Forbidden, match="role 'infer'; needs 'admin'") as info:
        require(infer, "admin")
    assert info.value.status == 403


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("root:ops:" + "a" * 64, "role 'root' is not one of metrics, infer, admin"),
        ("admin:ops:abc", "64 hex digits"),
        ("admin:o ps:" + "a" * 64, "key name"),
        ("admin:ops:" + "a" * 64 + ":fast", "must be a positive number"),
        ("admin:ops:" + "a" * 64 + ":-1", "must be a positive number"),
        ("admin:ops", "expected <role>:<name>:<sha256-hex>"),
        ("admin:ops:" + "a" * 64 + "\ninfer:ops:" + "b" * 64, "duplicate"),
    ],
)
def test_bad_key_files_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        KeyRing.parse(text, "api-keys")
    assert "api-keys entry" in str(info.value)


def test_keys_from_file_and_env_and_no_keys_refused(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    path = tmp_path / "keys"
    path.write_text(key_line("admin", "ops", a))
    ring = KeyRing.load(path, key_line("infer", "app", b), dev_mode=False)
    assert {p.name for p in ring.keys.values()} == {"ops", "app"}
    with pytest.raises(ConfigError, match="no API keys configured"):
        KeyRing.load(None, None, dev_mode=False)
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        KeyRing.load(tmp_path / "missing", None, dev_mode=False)
    dev = KeyRing.load(None, None, dev_mode=True)
    assert dev.authenticate(None).role == "admin"


def test_dev_mode_says_so_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    create_app(settings(tmp_path, dev_mode=True), bus=False)
    assert any(
        r.levelno == logging.WARNING and DEV_MODE_WARNING in r.message for r in caplog.records
    )
    with pytest.raises(ConfigError):
        create_app(settings(tmp_path), bus=False)


def test_rate_limit_refills_and_says_when_to_retry() -> None:
    now = [0.0]
    limiter = RateLimiter(default_rate=2.0, burst_s=1.0, clock=lambda: now[0])
    app = Principal("app", "infer")
    limiter.check(app)
    limiter.check(app)
    with pytest.raises(RateLimited) as info:
        limiter.check(app)
    assert info.value.status == 429 and info.value.headers() == {"retry-after": "1"}
    now[0] = 0.5  # one token back at 2/s
    limiter.check(app)
    slow = Principal("batch", "infer", rate_per_s=0.1)
    limiter.check(slow)
    with pytest.raises(RateLimited) as info:
        limiter.check(slow)
    assert info.value.retry_after_s == 10
    RateLimiter(default_rate=0).check(app)  # 0: no limit


# -- fleet, routing, ejection -----------------------------------------------------------


def beat(edge: str, ready: list[int], port: int, inflight: int = 0) -> Heartbeat:
    return Heartbeat(
        edge_id=edge,
        url=f"http://127.0.0.1:{port}",
        seq=1,
        ts=1.0,
        models={"digits": ModelState(ready=ready)},
        inflight=inflight,
    )


def fleet_of(now: list[float], *beats: Heartbeat) -> Fleet:
    fleet = Fleet(ttl=3.0, clock=lambda: now[0])
    for b in beats:
        fleet.observe(b)
    return fleet


def test_unversioned_requests_go_to_the_newest_version() -> None:
    now = [0.0]
    fleet = fleet_of(now, beat("edge-1", [1], 9001), beat("edge-2", [1, 2], 9002))
    router = Router(fleet)
    edge, version = router.route("digits", None)
    assert (edge.edge_id, version) == ("edge-2", 2)
    assert router.route("digits", 1, exclude=["edge-2"])[0].edge_id == "edge-1"
    with pytest.raises(Unavailable, match="no ready edge serves model 'digits'"):
        router.route("digits", None, exclude=["edge-2"])  # stays on version 2


def test_least_outstanding_then_pending_then_served() -> None:
    now = [0.0]
    fleet = fleet_of(now, beat("edge-1", [1], 9001, inflight=5), beat("edge-2", [1], 9002))
    assert fleet.choose("digits", 1).edge_id == "edge-2"  # type: ignore[union-attr]
    fleet.edges["edge-2"].outstanding = 1
    assert fleet.choose("digits", 1).edge_id == "edge-1"  # type: ignore[union-attr]
    assert fleet.choose_newest("digits")[0].edge_id == "edge-1"  # type: ignore[index]


def test_traffic_split_weights_and_fallback() -> None:
    now = [0.0]
    fleet = fleet_of(now, beat("edge-1", [1], 9001), beat("edge-2", [2], 9002))
    draws = iter([0.05, 0.5, 0.95])
    router = Router(fleet, draw=lambda: next(draws))
    router.set_split("digits", TrafficSplit(stable=1, candidate=2, candidate_weight=0.1))
    assert [router.route("digits", None)[1] for _ in range(3)] == [2, 1, 1]
    router.set_split("digits", TrafficSplit(stable=1, candidate=3, candidate_weight=1.0))
    router.draw = lambda: 0.0
    assert router.route("digits", None)[1] == 1  # candidate 3 is served nowhere: stable
    router.set_split("digits", None)
    assert router.route("digits", None)[1] == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stable": 1, "candidate_weight": 0.5}, "needs a candidate"),
        ({"stable": 1, "candidate": 1, "candidate_weight": 0.5}, "must differ"),
        ({"stable": 1, "candidate": 2, "candidate_weight": 1.5}, "less than or equal to 1"),
        ({"stable": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_traffic_splits_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrafficSplit.model_validate(fields)


def test_unknown_model_or_version_is_404_and_unavailable_is_503() -> None:
    now = [0.0]
    fleet = fleet_of(now, beat("edge-1", [1], 9001))
    router = Router(fleet)
    with pytest.raises(NotFound, match="'cats' is not found"):
        router.route("cats", None)
    with pytest.raises(NotFound, match="'digits' version 4 is not found"):
        router.route("digits", 4)
    with pytest.raises(NotFound, match="not a positive integer"):
        parse_version("x1")
    for _ in range(3):
        fleet.record_failure(fleet.edges["edge-1"])
    with pytest.raises(Unavailable, match="no ready edge serves model 'digits' version 1"):
        router.route("digits", 1)  # known, but ejected: 503, not 404


def test_ejection_backoff_probe_and_readmission() -> None:
    now = [0.0]
    ejected: list[str] = []
    fleet = fleet_of(now, beat("edge-1", [1], 9001), beat("edge-2", [1], 9002))
    fleet.on_eject = lambda e: ejected.append(e.edge_id)
    edge = fleet.edges["edge-1"]
    assert not fleet.record_failure(edge) and not fleet.record_failure(edge)
    fleet.record_success(edge)  # a success resets the run of failures
    assert [fleet.record_failure(edge) for _ in range(3)] == [False, False, True]
    assert ejected == ["edge-1"] and edge.ejected
    assert fleet.choose("digits", 1).edge_id == "edge-2"  # type: ignore[union-attr]
    assert fleet.due_for_probe() == []
    now[0] = 5.0
    fleet.observe(beat("edge-1", [1], 9001))  # heartbeats alone do not re-admit
    assert fleet.due_for_probe() == [edge]
    fleet.probed(edge, healthy=False)  # second ejection in a row: 10 s
    assert edge.ejected_until == 15.0 and ejected == ["edge-1", "edge-1"]
    now[0] = 15.0
    fleet.observe(beat("edge-1", [1], 9001))
    fleet.probed(edge, healthy=True)
    assert not edge.ejected and fleet.choose("digits", 1, exclude=["edge-2"]) is edge


def test_silent_edges_expire() -> None:
    now = [0.0]
    fleet = fleet_of(now, beat("edge-1", [1], 9001))
    now[0] = 3.5
    assert fleet.choose("digits", 1) is None and fleet.choose_newest("digits") is None
    assert fleet.fresh() == []


# -- checks of requests ---------------------------------------------------------------

SCHEMA = ModelSchema(
    "digits",
    1,
    (TensorSchema("pixels", "FP32", (-1, 64)), TensorSchema("mask", "INT8", (-1, 2))),
    (TensorSchema("logits", "FP32", (-1, 10)),),
)


def request(**changes: object) -> dict[str, object]:
    pixels: dict[str, object] = {
        "name": "pixels",
        "shape": [1, 64],
        "datatype": "FP32",
        "data": [0.5] * 64,
    }
    mask: dict[str, object] = {"name": "mask", "shape": [1, 2], "datatype": "INT8", "data": [1, 0]}
    pixels.update(changes)
    return {"inputs": [pixels, mask]}


def json_body(doc: object) -> bytes:
    import json

    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (request(), None),
        (request(data=[[0.5] * 64]), None),
        (request(datatype="FP64"), "input 'pixels': datatype FP64 does not match the model's FP32"),
        (request(datatype="FLOAT"), "input 'pixels': unknown datatype 'FLOAT'"),
        (
            request(shape=[1, 63]),
            "input 'pixels': shape [1, 63] does not match the model's [-1, 64]",
        ),
        (request(shape=[64]), "input 'pixels': shape [64] does not match"),
        (request(shape=[1, -64]), "input 'pixels': 'shape' must be a list of non-negative"),
        (request(data=[0.5] * 10), "input 'pixels': 'data' has 10 elements, but shape [1, 64]"),
        (request(data="abc"), "input 'pixels': 'data' must be a list, got str"),
        (request(data=["x"] * 64), "input 'pixels': 'data' element 0 ('x') is not a number"),
        (request(data=[True] * 64), "'data' element 0 (True) is not a number (FP32)"),
        (request(name="pix"), "unknown input 'pix' for model 'digits'"),
        (request(parameters=[]), "input 'pixels': 'parameters' must be an object"),
        (request(parameters={"binary_data_size": 256}), "give either 'data' or"),
        ({"inputs": request()["inputs"][:1]}, "missing input 'mask' for model 'digits'"),
        ({"inputs": [request()["inputs"][0]] * 2}, "input 'pixels' is given twice"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": [1]}, "inputs[0] must be an object"),
        ({"inputs": [{"shape": [1]}]}, "inputs[0] has no 'name' string"),
        ([1, 2], "must be a JSON object"),
        ({**request(), "id": 7}, "request 'id' must be a string"),
        ({**request(), "parameters": 1}, "request 'parameters' must be an object"),
        ({**request(), "outputs": [{"name": "probs"}]}, "unknown output 'probs'"),
        ({**request(), "outputs": {}}, "'outputs' must be a list"),
        (
            {**request(), "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
            "output 'logits': parameter 'binary_data' must be true or false",
        ),
    ],
)
def test_explain_names_the_input_and_the_problem(doc: object, message: str | None) -> None:
    problem = explain(json_body(doc), None, SCHEMA)
    if message is None:
        assert problem is None
    else:
        assert problem is not None and message in problem


def test_explain_integer_ranges_and_malformed_json() -> None:
    doc = request()
    doc["inputs"][1]["data"] = [1, 300]  # type: ignore[index]
    assert "'data' element 1 (300) is out of range for INT8" in str(
        explain(json_body(doc), None, SCHEMA)
    )
    assert "malformed request JSON" in str(explain(b'{"inputs": [}', None, SCHEMA))
    assert "nested too deeply" in str(explain(b"[" * 100_000, None, SCHEMA))
    assert explain(b" " * (4 * 1024 * 1024 + 1), None, SCHEMA) is None  # left to the edge


def binary_request(declared: int, payload: bytes, mask_declared: int = 2) -> tuple[bytes, int]:
    header = json_body(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": declared},
                },
                {
                    "name": "mask",
                    "shape": [1, 2],
                    "datatype": "INT8",
                    "parameters": {"binary_data_size": mask_declared},
                },
            ]
        }
    )
    return header + payload, len(header)


def test_explain_binary_sizes() -> None:
    good = struct.pack("<64f", *([0.5] * 64)) + b"\x01\x00"
    body, n = binary_request(256, good)
    assert explain(body, n, SCHEMA) is None
    body, n = binary_request(128, good)
    assert "input 'pixels': binary_data_size is 128 bytes, but shape [1, 64] of FP32 needs 256" in (
        explain(body, n, SCHEMA) or ""
    )
    body, n = binary_request(256, good[:-10])
    assert "binary tensor data is 248 bytes after the JSON header, but the inputs' " in (
        explain(body, n, SCHEMA) or ""
    )
    body, n = binary_request(256, good, mask_declared=-1)
    assert "binary_data_size must be a non-negative integer, got -1" in (
        explain(body, n, SCHEMA) or ""
    )
    assert "first 10 bytes" in (explain(body, 10, SCHEMA) or "")


def test_framing_check_is_cheap_and_strict() -> None:
    assert check_framing(None, 10, False) is None
    assert check_framing(b"10", 10, False) is None
    assert "outside the body of 10 bytes" in (check_framing(b"11", 10, False) or "")
    assert "outside the body" in (check_framing(b"0", 10, False) or "")
    assert "must be a byte count, got 'x'" in (check_framing(b"x", 10, False) or "")
    assert check_framing(b"11", 10, True) is None  # compressed: checked after decoding


def test_json_depth_is_bounded_cheaply() -> None:
    flat = json_body(request())
    assert check_depth(flat, len(flat)) is None
    nested = json_body(request(data=[[[[0.5] * 8] * 8]]))
    assert check_depth(nested, len(nested)) is None
    deep = b'{"inputs": ' + b"[" * 65 + b"]" * 65 + b"}"
    assert "nested more than 64 levels deep" in (check_depth(deep, len(deep)) or "")
    assert check_depth(deep, 20) is None  # only the JSON header counts
    quoted = json_body({"id": "[" * 100, **request()})
    assert check_depth(quoted, len(quoted)) is None  # brackets inside strings do not nest


def test_decode_body_and_triton_parse_errors() -> None:
    assert decode_body(gzip.compress(b"{}"), "gzip", 10) == b"{}"
    with pytest.raises(ValueError, match="exceeds 10 bytes"):
        decode_body(gzip.compress(b"x" * 1000), "gzip", 10)  # no bomb gets through
    with pytest.raises(ValueError, match="not valid gzip"):
        decode_body(b"plain", "gzip", 10)
    with pytest.raises(ValueError, match="unsupported Content-Encoding 'br'"):
        decode_body(b"x", "br", 10)
    assert is_triton_parse_error("failed to parse the request JSON buffer: Invalid value. at 12")
    assert is_triton_parse_error("Unable to parse 'data': Shape does not match true shape")
    assert not is_triton_parse_error("Failed to process the request(s) for model 'digits'")


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v2/models/digits/infer", ("digits", None)),
        ("/v2/models/digits/versions/3/infer", ("digits", "3")),
        ("/v2/models/digits/versions/x/infer", ("digits", "x")),
        ("/v2/models//infer", None),
        ("/v2/models/digits/ready", None),
        ("/v1/models/digits/infer", None),
        ("/v2/models/digits/versions/3/infer/x", None),
    ],
)
def test_infer_paths(path: str, target: tuple[str, str | None] | None) -> None:
    assert split_infer_path(path) == target


def test_metrics_exposition() -> None:
    now = [0.0]
    fleet = fleet_of(now, beat("edge-1", [1], 9001))
    metrics = GatewayMetrics()
    metrics.observe("digits", "1", "edge-1", 200, 0.0004)
    metrics.observe("digits", "1", "edge-1", 200, 0.003)
    metrics.observe("<unknown>", "", "", 404, 0.0001)
    metrics.stats.inflight["digits"] = 2
    metrics.retries.labels("digits", "connect").inc()
    text = metrics.render(fleet).decode()
    assert (
        'fedgate_gateway_requests_total{edge="edge-1",model="digits",status="200",version="1"} 2.0'
        in text
    )
    bucket = "fedgate_gateway_request_duration_seconds_bucket"
    assert f'{bucket}{{le="0.0005",model="digits",version="1"}} 1.0' in text
    assert f'{bucket}{{le="+Inf",model="digits",version="1"}} 2.0' in text
    assert 'fedgate_gateway_request_duration_seconds_count{model="digits",version="1"} 2.0' in text
    assert 'fedgate_gateway_inflight_requests{model="digits"} 2.0' in text
    assert 'fedgate_gateway_retries_total{model="digits",reason="connect"} 1.0' in text
    assert 'fedgate_gateway_edges{state="admitted"} 1.0' in text


def test_openapi_documents_the_infer_routes(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path, dev_mode=True), bus=False)
    paths = app.api.openapi()["paths"]
    assert "post" in paths["/v2/models/{model}/versions/{version}/infer"]
    assert {"/v2/models/{model}/infer", "/v1/models/{model}/routing", "/metrics"} <= set(paths)


def settings(tmp_path: Path, **changes: object) -> GatewaySettings:
    fields: dict[str, object] = {
        "nats_user": "gateway",
        "nats_password_file": tmp_path / "nats.pass",
        "log_json": False,
    }
    fields.update(changes)
    return GatewaySettings.model_validate(fields)
