"""Request ids the gateway logs for failed and retried inference requests."""

from __future__ import annotations

import json
import re

import pytest

from gateway.request_ids import SCAN_BYTES, client_id, request_id


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id":"req-7","inputs":[]}', "req-7"),
        (b'{ "id" : "a\\"b", "inputs": []}', 'a"b'),
        (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"id":"late"}', "late"),
        (b'{"inputs":[]}', None),
        (b'{"id":"has space"}', None),  # not a valid request id
        (b'{"id":"' + b"x" * 257 + b'"}', None),
        (b'{"id":"bad\\u0000"}', None),
        (b"not json at all", None),
    ],
)
def test_client_ids(body: bytes, expected: str | None) -> None:
    assert client_id(body) == expected


def test_binary_requests_are_searched_in_their_json_header_only() -> None:
    header = json.dumps({"id": "bin-1", "inputs": []}).encode()
    tensor = b'"id":"not-this"' * 10
    assert client_id(header + tensor, str(len(header)).encode()) == "bin-1"
    assert client_id(b'{"inputs":[]}' + tensor, b"13") is None


def test_only_the_start_of_a_large_body_is_searched() -> None:
    body = b'{"inputs":[{"data":[' + b"0," * SCAN_BYTES + b'0]}],"id":"far"}'
    assert client_id(body) is None
    generated = request_id(body)
    assert re.fullmatch(r"gw-[0-9a-f]{16}", generated)
    assert request_id(body) != generated
    assert request_id(b'{"id":"mine"}') == "mine"
