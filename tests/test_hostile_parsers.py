"""Hypothesis fuzzing of every parser that reads bytes an adversary controls.

Each parser gets arbitrary bytes and mutations of valid inputs (bit flips, cuts,
insertions, splices, subtrees replaced by arbitrary JSON) and may only answer in its
documented way: a problem message, or its own error type with a reason. Anything else (an
``IndexError``, a ``RecursionError``, a ``KeyError``...) is a crash a client, an edge or
a network attacker could trigger.

- the gateway's hot-path checks on inference requests (``check_framing``, the binary
  tensor extension's header length; ``check_depth``) and the refusal explainer
  (``explain``: JSON and binary tensor bodies against the model's metadata), body
  decoding (gzip, deflate), request-id extraction, Triton metadata parsing;
- the sealed update envelope (``open_update``, ``read_header_unverified``), update
  pointers and subjects, update payload decoding (every compression mode);
- NATS wire messages (heartbeats, rounds, desired versions, round records), the
  secure-aggregation messages, and signed model manifests.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedcore.artifact import MANIFEST, sign_version_dir, verify_version_dir
from fedcore.compression import CompressionSettings, decode_update, encode_update
from fedcore.envelope import open_update, read_header_unverified, seal_update
from fedcore.errors import ArtifactError, EnvelopeError, SecAggError, TransportError
from fedcore.secagg import messages as secagg_messages
from fedcore.transport import UpdatePointer, is_pointer, parse_update_subject
from fedcore.wire import (
    DesiredVersions,
    Heartbeat,
    ModelState,
    RoundAnnouncement,
    RoundRecord,
    WireError,
    decode_heartbeat,
)
from gateway.request_ids import REQUEST_ID, request_id
from gateway.schemas import ModelSchema, TensorSchema
from gateway.validate import MAX_JSON_DEPTH, check_depth, check_framing, decode_body, explain

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
SCHEMA = ModelSchema(
    "digits",
    1,
    (TensorSchema("pixels", "FP32", (-1, 64)),),
    (TensorSchema("logits", "FP32", (-1, 10)),),
)
ROW = [0.5] * 64
VALID: dict[str, Any] = {
    "id": "r-1",
    "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}],
    "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
}
BINARY_HEADER = {
    "inputs": [
        {
            "name": "pixels",
            "shape": [1, 64],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 256},
        }
    ]
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
json_or_special = (
    json_values
    | st.sampled_from(
        ["pixels", "FP32", "BYTES", "logits", -1, 0, 64, [1, 64], [-1], {"binary_data_size": -3}]
    )
).map(lambda v: json.loads(json.dumps(v)))  # a fresh copy: mutations must not share it


@st.composite
def mutated_document(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with a few subtrees (at any depth) replaced by arbitrary JSON."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        node, key = doc, None
        path_len = draw(st.integers(0, 4))
        parent: Any = None
        for _ in range(path_len):
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node)))
            elif isinstance(node, list) and node:
                key = draw(st.integers(0, len(node) - 1))
            else:
                break
            parent, node = node, node[key]
        if parent is None:
            if isinstance(doc, dict):
                doc[draw(st.sampled_from(["id", "inputs", "outputs", "parameters", "x"]))] = draw(
                    json_or_special
                )
            continue
        parent[key] = draw(json_or_special)
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with bit flips, a cut, an insertion or a duplicated slice."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 64)) :]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            end = draw(st.integers(at, min(len(data), at + 64)))
            data[at:at] = data[at:end]
    return bytes(data)


def json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


# -- the gateway's inference checks ---------------------------------------------------------


@FUZZ
@given(header=st.none() | st.binary(max_size=30), length=st.integers(0, 2**40), enc=st.booleans())
@example(header=b"99999999999999999999999999", length=10, enc=False)
@example(header="٣".encode(), length=10, enc=False)  # a digit to str.isdigit, not to int()
def test_check_framing_only_answers(header: bytes | None, length: int, enc: bool) -> None:
    problem = check_framing(header, length, enc)
    assert problem is None or isinstance(problem, str)
    if problem is None and header is not None and not enc:
        assert 0 < int(header) <= length


@FUZZ
@given(doc=json_values, limit=st.integers(1, 12))
def test_check_depth_agrees_with_the_real_depth(doc: Any, limit: int) -> None:
    body = json.dumps(doc).encode()
    problem = check_depth(body, len(body), limit)
    assert (problem is None) == (json_depth(doc) <= limit), (problem, json_depth(doc))


@FUZZ
@given(body=st.binary(max_size=400), end=st.integers(0, 500))
@example(body=b"[" * 100_000, end=100_000)
@example(body=b'"\\' * 1000 + b"[" * 100, end=10_000)
def test_check_depth_never_raises(body: bytes, end: int) -> None:
    problem = check_depth(body, min(end, len(body)))
    assert problem is None or f"{MAX_JSON_DEPTH} levels" in problem


@FUZZ
@given(doc=mutated_document(VALID))
def test_explain_answers_any_json_request(doc: Any) -> None:
    problem = explain(json.dumps(doc).encode(), None, SCHEMA)
    assert problem is None or isinstance(problem, str)


@FUZZ
@given(doc=json_values)
def test_explain_answers_any_json_value(doc: Any) -> None:
    problem = explain(json.dumps(doc).encode(), None, SCHEMA)
    assert problem is None or isinstance(problem, str)


@FUZZ
@given(
    doc=mutated_document(BINARY_HEADER),
    payload=st.integers(0, 600),
    cut=st.integers(-20, 20),
)
def test_explain_answers_any_binary_request(doc: Any, payload: int, cut: int) -> None:
    header = json.dumps(doc).encode()
    body = header + b"\0" * payload
    header_length = max(0, len(header) + cut)
    problem = explain(body, header_length, SCHEMA)
    assert problem is None or isinstance(problem, str)
    if cut == 0 and doc == BINARY_HEADER:
        assert (problem is None) == (payload == 256), problem


@FUZZ
@given(body=st.binary(max_size=300), header_length=st.none() | st.integers(0, 400))
@example(body=b"[" * 5000 + b"]" * 5000, header_length=None)
@example(body='{"a":"\ud800"}'.encode("utf-8", "surrogatepass"), header_length=None)
def test_explain_answers_any_bytes(body: bytes, header_length: int | None) -> None:
    problem = explain(body, header_length, SCHEMA)
    assert problem is None or isinstance(problem, str)


@FUZZ
@given(
    raw=st.binary(max_size=300),
    encoding=st.sampled_from(["gzip", "deflate", "identity", "br", "", "GZIP"]),
    limit=st.integers(1, 1000),
    valid=st.booleans(),
)
def test_decode_body_returns_bounded_bytes_or_value_error(
    raw: bytes, encoding: str, limit: int, valid: bool
) -> None:
    if valid and encoding in ("gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        packer = zlib.compressobj(wbits=wbits)
        raw = packer.compress(raw * 50) + packer.flush()
    try:
        out = decode_body(raw, encoding, limit)
    except ValueError:
        return
    assert encoding in ("", "identity") or len(out) <= limit


@FUZZ
@given(
    body=st.binary(max_size=300) | mutated_bytes(json.dumps(VALID).encode()),
    header_length=st.none() | st.binary(max_size=8),
)
def test_request_ids_are_the_clients_or_generated(body: bytes, header_length: bytes | None) -> None:
    rid = request_id(body, header_length)
    assert REQUEST_ID.fullmatch(rid) or rid.startswith("gw-")


@FUZZ
@given(
    meta=mutated_document(
        {
            "name": "digits",
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        }
    )
)
def test_triton_metadata_from_an_edge_parses_or_is_refused(meta: Any) -> None:
    with contextlib.suppress(ValueError):
        ModelSchema.from_metadata(meta, 1)


# -- the update envelope and its transport ---------------------------------------------------

EDGE = ed25519.Ed25519PrivateKey.generate()
TRAINER = x25519.X25519PrivateKey.generate()
_, ENVELOPE = seal_update(
    b"\x01\x02" * 100,
    recipient=TRAINER.public_key(),
    signer=EDGE,
    model="digits",
    round=3,
    edge_id="edge-1",
    base_version=2,
    base_digest="a" * 64,
    num_samples=10,
    chunk_size=64,
)
GOOD_ENVELOPE = bytes(ENVELOPE)


def keys(edge_id: str) -> ed25519.Ed25519PublicKey | None:
    return EDGE.public_key() if edge_id == "edge-1" else None


@FUZZ
@given(data=st.binary(max_size=600) | mutated_bytes(GOOD_ENVELOPE))
def test_envelopes_open_only_untouched(data: bytes) -> None:
    try:
        _header, payload = open_update(data, recipient=TRAINER, edge_keys=keys, max_payload=4096)
    except EnvelopeError as exc:
        assert exc.reason
    else:
        assert data == GOOD_ENVELOPE and bytes(payload) == b"\x01\x02" * 100
    with contextlib.suppress(EnvelopeError):
        read_header_unverified(data)


@FUZZ
@given(
    data=st.binary(max_size=200)
    | mutated_bytes(
        UpdatePointer("fedgate_updates", "digits/edge-1/" + "f" * 32, "0" * 64, 10).encode()
    ),
    subject=st.text(max_size=60),
)
def test_pointers_and_subjects_parse_or_are_refused(data: bytes, subject: str) -> None:
    if is_pointer(data):
        with contextlib.suppress(TransportError):
            UpdatePointer.decode(data)
    with contextlib.suppress(TransportError):
        parse_update_subject(subject)


SIZES = [40, 24]
PAYLOADS = {
    mode: encode_update(
        np.linspace(-1, 1, 64, dtype=np.float32),
        SIZES,
        CompressionSettings(mode=mode, **({"topk_fraction": 0.25} if mode == "topk" else {})),
    ).data
    for mode in ("none", "fp16", "int8", "topk")
}


@FUZZ
@given(
    mode=st.sampled_from(sorted(PAYLOADS)),
    data=st.data(),
)
def test_update_payloads_decode_or_are_refused(mode: str, data: st.DataObject) -> None:
    raw = data.draw(st.binary(max_size=400) | mutated_bytes(PAYLOADS[mode]))
    try:
        out = decode_update(raw, mode, SIZES)
    except Exception as exc:
        assert type(exc).__name__ == "CodecError", repr(exc)
    else:
        assert out.shape == (64,) and np.isfinite(out).all()


# -- NATS messages, secure aggregation, manifests -------------------------------------------

BEAT = Heartbeat(
    edge_id="edge-1",
    url="http://127.0.0.1:8000",
    seq=1,
    ts=1.0,
    models={"digits": ModelState(ready=[1])},
).encode()
WIRE = {
    "heartbeat": (decode_heartbeat, BEAT),
    "round": (RoundAnnouncement.decode, b"{}"),
    "desired": (
        DesiredVersions.decode,
        DesiredVersions(
            model="digits", stable=1, candidate=2, rollout="r-0123456789ab", ts=1.0
        ).encode(),
    ),
    "record": (RoundRecord.decode, b"{}"),
}


@FUZZ
@given(which=st.sampled_from(sorted(WIRE)), data=st.data())
@example(which="heartbeat", data=None)
def test_wire_messages_decode_or_are_refused(which: str, data: st.DataObject | None) -> None:
    decode, valid = WIRE[which]
    raw = (
        b"[" * 100_000
        if data is None
        else data.draw(st.binary(max_size=300) | mutated_bytes(valid))
    )
    with contextlib.suppress(WireError):
        decode(raw)


def heartbeat_mutations() -> st.SearchStrategy[Any]:
    return mutated_document(json.loads(BEAT))


@FUZZ
@given(doc=heartbeat_mutations())
def test_heartbeat_documents_decode_or_are_refused(doc: Any) -> None:
    try:
        beat = decode_heartbeat(json.dumps(doc).encode())
    except WireError:
        return
    assert beat.url.startswith(("http://", "https://"))


SECAGG = [
    cls
    for cls in vars(secagg_messages).values()
    if isinstance(cls, type)
    and hasattr(cls, "from_bytes")
    and cls.__module__ == secagg_messages.__name__
]


@pytest.mark.parametrize("cls", SECAGG, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.binary(max_size=300))
def test_secagg_messages_decode_or_are_refused(cls: Any, data: bytes) -> None:
    try:
        cls.from_bytes(data)
    except SecAggError as exc:
        assert exc.reason


SIGNER = ed25519.Ed25519PrivateKey.generate()


def signed_manifest() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "model.py").write_text("# model\n")
        sign_version_dir(d, SIGNER, model="digits", version=3)
        return (d / MANIFEST).read_bytes()


MANIFEST_BYTES = signed_manifest()


@FUZZ
@given(
    data=st.binary(max_size=300)
    | mutated_bytes(MANIFEST_BYTES)
    | mutated_document(json.loads(MANIFEST_BYTES)).map(lambda d: json.dumps(d).encode())
)
def test_manifests_verify_only_untouched(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "model.py").write_text("# model\n")
        (d / MANIFEST).write_bytes(data)
        try:
            verify_version_dir(d, SIGNER.public_key(), model="digits", version=3)
        except ArtifactError as exc:
            assert exc.reason
        else:  # only what is outside the signed part may differ (it is ignored)
            doc, original = json.loads(data), json.loads(MANIFEST_BYTES)
            assert doc["manifest"] == original["manifest"]
            assert doc["signature"] == original["signature"]
