"""Unit tests of the gateway's pre-forward check (gateway/guard.py), its header integers,
and the ejection backoff (issue #16 findings 4 and 5)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.wire import Heartbeat, ModelState
from gateway import guard, validate
from gateway.app import build_state, create_app, retire_series
from gateway.auth import generate_key, key_line
from gateway.fleet import Fleet
from gateway.guard import check_request, repeated_header
from gateway.metrics import DEPARTED
from gateway.routing import TrafficSplit
from gateway.schemas import ModelSchema, TensorSchema
from gateway.settings import GatewaySettings
from gateway.validate import check_framing, parse_count

SCHEMA = ModelSchema(
    "digits",
    1,
    (TensorSchema("pixels", "FP32", (-1, 64)), TensorSchema("mask", "INT8", (-1, 2))),
    (TensorSchema("logits", "FP32", (-1, 10)),),
    max_batch_size=8,
)


def tensors(pixels: dict[str, object] | None = None, **doc: object) -> bytes:
    item: dict[str, object] = {"name": "pixels", "shape": [1, 64], "datatype": "FP32"}
    item.update({"data": [0.5] * 64} if pixels is None or "parameters" not in pixels else {})
    item.update(pixels or {})
    mask = {"name": "mask", "shape": [1, 2], "datatype": "INT8", "data": [0, 1]}
    return json.dumps({"inputs": [item, mask], **doc}).encode()


GOOD = tensors()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (GOOD, None),
        (tensors({"shape": [2, 64], "data": [[0.5] * 64] * 2}), None),  # nested data
        (tensors(outputs=[{"name": "logits", "parameters": {"binary_data": True}}]), None),
        (tensors({"shape": [2147483648, 64], "data": [0.5]}), "dimension 0 is larger"),
        (tensors({"shape": [2**62] * 2}), "dimension 0 is larger"),
        (tensors({"shape": [1, 2**62]}), "does not match the model's [-1, 64] (-1: any) at 1"),
        (tensors({"shape": [9, 64], "data": [0.5] * 576}), "batch-size must be <= 8"),
        (tensors({"shape": [64]}), "rank 1"),
        (tensors({"shape": [1, 64], "data": [0.5] * 63}), "'data' has 63 elements"),
        (tensors({"shape": [1, True]}), "non-negative integers"),
        (tensors({"shape": [-1, 64]}), "non-negative integers"),
        (tensors({"datatype": "FP64"}), "datatype FP64 does not match the model's FP32"),
        (tensors({"data": {"a": 1}}), "'data' must be a list"),
        (tensors({"name": "other"}), "unknown input 'other'"),
        (tensors({"parameters": {"shared_memory_region": "r"}}), "shared memory"),
        (
            tensors(outputs=[{"name": "logits", "parameters": {"shared_memory_region": "r"}}]),
            "output 'logits': shared memory",
        ),
        (tensors(outputs=[{"name": "probs"}]), "unknown output 'probs'"),
        (tensors(id=5), "request 'id' must be a string"),
        (b'{"inputs": [], "inputs": []}', "repeats the key 'inputs'"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff", "malformed request JSON"),
        (json.dumps({"inputs": [{"name": "mask"}]}).encode(), "unknown datatype None"),
    ],
)
def test_check_request_names_what_is_wrong(body: bytes, message: str | None) -> None:
    found = check_request(body, None, SCHEMA)
    if message is None:
        assert found is None
    else:
        assert found is not None and message in found, found


def test_binary_sizes_must_match_the_shape_and_add_up() -> None:
    def binary(size: object, payload: int) -> str | None:
        header = tensors({"parameters": {"binary_data_size": size}})
        return check_request(header + b"\0" * payload, len(header), SCHEMA)

    for _ in range(2):  # the second time from the answers kept per header and payload
        assert binary(256, 256) is None
        assert "add up to 256" in (binary(256, 255) or "")
        assert "needs 256" in (binary(8, 8) or "")
    assert "needs 256" in (binary(8, 8) or "")
    assert "but shape [1, 64] of FP32 needs 256" in (binary(2**70, 256) or "")
    assert "non-negative integer" in (binary(-1, 256) or "")
    assert "add up to 256" in (binary(256, 200) or "")
    assert "add up to 256" in (binary(256, 300) or "")
    header = tensors({"parameters": {"binary_data_size": 256}, "data": [0.5] * 64})
    assert "not both" in (check_request(header + b"\0" * 256, len(header), SCHEMA) or "")


def test_bytes_tensors_need_four_bytes_an_element() -> None:
    schema = ModelSchema("t", 1, (TensorSchema("s", "BYTES", (-1,)),), (), max_batch_size=0)
    item = {"name": "s", "shape": [3], "datatype": "BYTES"}
    header = json.dumps({"inputs": [{**item, "parameters": {"binary_data_size": 11}}]})
    assert "needs 12" in (check_request(header.encode() + b"\0" * 11, len(header), schema) or "")
    body = json.dumps({"inputs": [{**item, "data": ["a", "b", "c"]}]}).encode()
    assert check_request(body, None, schema) is None


def test_repeated_framing_headers() -> None:
    once = [(b"content-length", b"3"), (b"content-encoding", b"gzip"), (b"x-other", b"1")]
    assert repeated_header([*once, (b"x-other", b"2")]) is None
    assert repeated_header([*once, (b"content-encoding", b"identity")]) == "Content-Encoding"
    twice = [(b"inference-header-content-length", b"1")] * 2
    assert repeated_header(twice) == "Inference-Header-Content-Length"
    assert repeated_header([(b"transfer-encoding", b"chunked")] * 2) == "Transfer-Encoding"


def test_header_integers_are_parsed_with_a_length_bound() -> None:
    assert parse_count(b"123") == 123
    assert parse_count(b"9" * 18) == 10**18 - 1
    for bad in (b"9" * 19, b"9" * 5000, b"-1", b"1e3", b"", b" 1", "\u0661".encode()):
        assert parse_count(bad) is None, bad
    started = time.perf_counter()
    problem = check_framing(b"9" * 5000, 100, False)
    assert (
        problem is not None
        and "has 5000 digits: a byte count has at most 18" in problem
        and len(problem) < 200
    )
    assert time.perf_counter() - started < 0.05


def test_the_ejection_backoff_never_overflows() -> None:
    """Before: ``eject_base_s * 2**n`` overflowed a float after ~1,000 failed probes and
    every later failure was an OverflowError (a 500). The time out stays at the maximum."""
    now = [0.0]
    fleet = Fleet(ttl=1e12, clock=lambda: now[0], eject_base_s=5.0, eject_max_s=60.0)
    fleet.observe(
        Heartbeat(edge_id="e", url="http://e", seq=1, ts=0.0, models={"d": ModelState(ready=[1])})
    )
    edge = fleet.edges["e"]
    for _ in range(3):
        fleet.record_failure(edge)
    for _ in range(5000):
        assert edge.ejected_until is not None
        assert edge.ejected_until - now[0] <= 60.0
        now[0] = edge.ejected_until
        fleet.probed(edge, healthy=False)
    assert edge.ejected_until == now[0] + 60.0
    fleet.probed(edge, healthy=True)
    fleet.record_success(edge)
    assert not edge.ejected and edge.ejections_in_a_row == 0


async def test_no_page_loads_scripts_from_another_origin(tmp_path: Path) -> None:
    """Before: ``/docs`` and ``/redoc`` loaded Swagger UI and ReDoc from a CDN on the
    dashboard's origin. They are off; ``/openapi.json`` stays."""
    settings = GatewaySettings.model_validate(
        {
            "nats_user": "gateway",
            "nats_password_file": tmp_path / "nats.pass",
            "log_json": False,
            "api_keys": key_line("infer", "viewer", generate_key()),
        }
    )
    app = create_app(settings, bus=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            page = await client.get(path)
            assert page.status_code == 404, path
            assert "cdn" not in page.text and "https://" not in page.text
        document = await client.get("/openapi.json")
        assert document.status_code == 200 and "/v2/models/{model}/infer" in document.text


def beat(edge_id: str, url: str, versions: list[int]) -> Heartbeat:
    return Heartbeat(
        edge_id=edge_id, url=url, seq=1, ts=0.0, models={"digits": ModelState(ready=versions)}
    )


def test_pools_and_series_of_departed_edges_and_retired_versions_are_dropped(
    tmp_path: Path,
) -> None:
    """Before: an upstream pool per edge URL and every (model, version, edge) series stayed
    for the life of the process, whatever left the fleet."""
    settings = GatewaySettings.model_validate(
        {
            "nats_user": "gateway",
            "nats_password_file": tmp_path / "nats.pass",
            "log_json": False,
            "api_keys": key_line("infer", "app", generate_key()),
        }
    )
    now = [0.0]
    state = build_state(settings, Fleet(ttl=5.0, clock=lambda: now[0]))
    fleet, stats = state.fleet, state.metrics.stats
    for edge_id, port, versions in (
        ("edge-1", 9001, [1]),
        ("edge-2", 9002, [2]),
        ("edge-3", 9003, [2]),
    ):
        fleet.observe(beat(edge_id, f"http://127.0.0.1:{port}", versions))
        state.upstream._pool(f"http://127.0.0.1:{port}")  # as a request would
        state.metrics.ejections.labels(edge_id).inc()
    for edge_id, version in (("edge-1", "1"), ("edge-2", "2"), ("edge-3", "2")):
        state.metrics.observe("digits", version, edge_id, 200, 0.01)
    state.metrics.observe("digits", "", "", 400, 0.001)  # refused before routing
    assert state.upstream.pools == 3

    fleet.leave("edge-1")  # leaves: its pool goes, its counts fold under <departed>
    fleet.observe(beat("edge-2", "http://127.0.0.1:9012", [2]))  # moved: old pool goes
    assert state.upstream.pools == 1
    assert ("digits", "1", DEPARTED, 200) in stats.requests
    assert all(k[2] != "edge-1" for k in stats.requests)
    assert ("digits", "2", "edge-2", 200) in stats.requests  # still in the fleet
    assert b'edge="edge-1"' not in state.metrics.render(fleet)

    now[0] = 6.0  # edge-3 falls silent and expires; edge-2 keeps beating
    fleet.observe(beat("edge-2", "http://127.0.0.1:9012", [2]))
    assert [e.edge_id for e in fleet.fresh()] == ["edge-2"]
    assert state.upstream.pools == 0 and all(k[2] != "edge-3" for k in stats.requests)

    retire_series(state, now[0], grace_s=60.0)  # version 1: no edge serves it any more
    assert ("digits", "1") in stats.latency  # within the grace period
    state.router.set_split("digits", TrafficSplit(stable=1))
    retire_series(state, now[0] + 61, grace_s=60.0)  # still in a split: kept
    assert ("digits", "1") in stats.latency
    state.router.set_split("digits", None)
    retire_series(state, now[0] + 62, grace_s=60.0)
    retire_series(state, now[0] + 123, grace_s=60.0)
    assert set(stats.latency) == {("digits", "2"), ("digits", "")}
    assert {k[:2] for k in stats.requests} == {("digits", "2"), ("digits", "")}


JUNK = st.sampled_from([None, True, -1, 2**63, 1.5, "x", [], {}, [1, 64], "FP32", "pixels"])


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[dict[str, object], int]:
    """A parsed request for SCHEMA with a few fields replaced by junk, and its payload."""
    doc = json.loads(tensors(outputs=[{"name": "logits", "parameters": {"binary_data": True}}]))
    payload = 0
    if draw(st.booleans()):
        doc["inputs"][0].pop("data")
        doc["inputs"][0]["parameters"] = {"binary_data_size": 256}
        payload = 256
    targets = {
        "request": doc,
        "pixels": doc["inputs"][0],
        "mask": doc["inputs"][1],
        "params": doc["inputs"][0].setdefault("parameters", {}),
        "output": doc["outputs"][0],
    }
    if not targets["params"]:
        doc["inputs"][0].pop("parameters")
    for _ in range(draw(st.integers(0, 3))):
        target = targets[draw(st.sampled_from(sorted(targets)))]
        key = draw(
            st.sampled_from(
                [
                    "name",
                    "shape",
                    "datatype",
                    "data",
                    "parameters",
                    "id",
                    "inputs",
                    "outputs",
                    "binary_data_size",
                    "binary_data",
                    "binary_data_output",
                    "shared_memory_region",
                ]
            )
        )
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(JUNK)
    return doc, draw(st.one_of(st.just(payload), st.integers(0, 300)))


@given(case=near_valid())
@settings(max_examples=1500, deadline=None, derandomize=True, database=None)
def test_the_fast_path_accepts_only_what_the_full_checks_accept(
    case: tuple[dict[str, object], int],
) -> None:
    doc, payload = case
    if guard._fits(doc, SCHEMA, 4096, payload):
        assert validate.problem_of(doc, SCHEMA, 4096, payload) is None, doc


def test_the_fast_path_takes_the_usual_requests() -> None:
    for body in (GOOD, tensors({"shape": [2, 64], "data": [[0.5] * 64] * 2})):
        assert guard._fits(json.loads(body), SCHEMA, len(body), 0)


@given(case=near_valid())
@settings(max_examples=800, deadline=None, derandomize=True, database=None)
def test_the_explainer_and_the_guard_name_the_same_structural_problem(
    case: tuple[dict[str, object], int],
) -> None:
    """One implementation of the structural checks (gateway.validate.problem_of): before,
    the explainer had its own copy, with other messages (no dimension or rank in a shape
    mismatch, shared memory let through, BYTES sizes unchecked)."""
    doc, payload = case
    header = json.dumps(doc).encode()
    body = header + b"\0" * payload
    header_length = len(header) if payload else None
    guarded = check_request(body, header_length, SCHEMA)
    explained = validate.explain(body, header_length, SCHEMA)
    if guarded is not None:
        assert explained == guarded
    else:  # structurally sound: only an element value can still be wrong
        assert explained is None or "'data' element" in explained


def test_the_explainer_refuses_shared_memory_as_the_guard_does() -> None:
    body = tensors({"parameters": {"shared_memory_region": "r", "binary_data_size": 256}})
    assert check_request(body, None, SCHEMA) == validate.explain(body, None, SCHEMA)
    assert "shared memory" in (validate.explain(body, None, SCHEMA) or "")


def test_a_refusal_quotes_the_float_the_client_sent() -> None:
    """Found by the agreement test above: the guard counts floats (parse_float=len), and
    its message said 'got 3' for a binary_data_size of 1.5."""
    body = tensors({"parameters": {"binary_data_size": 1.5}})
    assert check_request(body, None, SCHEMA) == (
        "input 'pixels': binary_data_size must be a non-negative integer, got 1.5"
    )
