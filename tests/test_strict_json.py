"""Strict JSON: one helper (fedcore.strict_json), and every strict parser refuses a
repeated key through it, naming the key."""

from __future__ import annotations

import pytest

from fedcore.enrollment import EdgeRegistry, decode_record
from fedcore.envelope_header import UpdateHeader
from fedcore.errors import EnrollmentError, EnvelopeError, TransportError
from fedcore.strict_json import RepeatedKey, loads_strict, strict_decoder
from fedcore.transport import POINTER_MAGIC, UpdatePointer
from gateway.guard import check_request
from gateway.schemas import ModelSchema, TensorSchema


def test_loads_strict_names_the_repeated_key_at_any_depth() -> None:
    assert loads_strict('{"a": {"b": 1}, "c": [1, 2]}') == {"a": {"b": 1}, "c": [1, 2]}
    with pytest.raises(RepeatedKey) as info:
        loads_strict('{"a": [{"x": 1, "y": 2, "x": 3}]}')
    assert info.value.key == "x"
    assert isinstance(info.value, ValueError)
    assert "duplicate key 'x'" in str(info.value)


def test_strict_decoder_passes_parse_float_on() -> None:
    assert strict_decoder(parse_float=len).decode("[1.25, 2, 0.5]") == [4, 2, 3]
    with pytest.raises(RepeatedKey):
        strict_decoder(parse_float=len).decode('{"k": 1.5, "k": 2.5}')


SHA = "0" * 64


@pytest.mark.parametrize(
    ("decode", "data", "error"),
    [
        (UpdateHeader.decode, b'{"model": "a", "model": "b"}', EnvelopeError),
        (EdgeRegistry.decode, b'{"edge-1": {}, "edge-1": {}}', EnrollmentError),
        (decode_record, b'{"public_key": "a", "public_key": "b"}', EnrollmentError),
        (
            UpdatePointer.decode,
            POINTER_MAGIC
            + b'{"bucket":"b","name":"m/edge-1/'
            + b"0" * 32
            + b'","name":"x","sha256":"'
            + SHA.encode()
            + b'","size":1}',
            TransportError,
        ),
    ],
    ids=["update-header", "edge-registry", "edge-record", "update-pointer"],
)
def test_every_strict_parser_refuses_a_repeated_key(
    decode: object, data: bytes, error: type[Exception]
) -> None:
    assert callable(decode)
    with pytest.raises(error, match=r"duplicate key '[a-z_0-9-]+'"):
        decode(data)


def test_the_gateway_guard_names_the_repeated_key() -> None:
    schema = ModelSchema(
        name="m",
        version=1,
        inputs=(TensorSchema("x", "FP32", (-1, 2)),),
        outputs=(TensorSchema("y", "FP32", (-1, 1)),),
        max_batch_size=8,
    )
    body = b'{"inputs": [{"name": "x", "name": "x", "datatype": "FP32", "shape": [1, 2]}]}'
    assert check_request(body, None, schema) == "request JSON repeats the key 'name' in one object"
