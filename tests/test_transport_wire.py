"""Sans-IO parts of the update transport: subjects, the pointer message, size routing."""

from __future__ import annotations

import hashlib
import json

import pytest

from fedcore.errors import TransportError
from fedcore.transport import (
    HEADER_ROOM,
    POINTER_MAGIC,
    StreamSpec,
    UpdatePointer,
    fits_inline,
    is_pointer,
    parse_update_subject,
    update_object_name,
    update_subject,
    updates_filter,
)

UID = "0123456789abcdef0123456789abcdef"


def test_subjects_round_trip_and_filters() -> None:
    subject = update_subject("digits", "edge-1")
    assert subject == "fedgate.updates.digits.edge-1"
    assert parse_update_subject(subject) == ("digits", "edge-1")
    assert updates_filter() == "fedgate.updates.>"
    assert updates_filter("digits") == "fedgate.updates.digits.*"


@pytest.mark.parametrize(
    ("model", "edge"), [("a.b", "edge-1"), ("digits", "Edge"), ("*", "e"), ("digits", "e.x")]
)
def test_subject_parts_that_are_not_one_token_are_refused(model: str, edge: str) -> None:
    with pytest.raises(TransportError) as info:
        update_subject(model, edge)
    assert info.value.reason == "bad-subject"


@pytest.mark.parametrize(
    "subject",
    [
        "fedgate.updates.digits",
        "fedgate.updates.digits.edge-1.x",
        "fedgate.other.digits.edge-1",
        "fedgate.updates.digits.EDGE",
        "",
    ],
)
def test_parse_refuses_other_subjects(subject: str) -> None:
    with pytest.raises(TransportError) as info:
        parse_update_subject(subject)
    assert info.value.reason == "bad-subject"


def test_pointer_round_trip_and_check() -> None:
    envelope = b"FGUE" + bytes(1000)
    name = update_object_name("digits", "edge-1", UID)
    pointer = UpdatePointer.for_envelope(envelope, "fedgate_updates", name)
    data = pointer.encode()
    assert data.startswith(POINTER_MAGIC) and is_pointer(data) and not is_pointer(envelope)
    assert json.loads(data[4:]) == {
        "bucket": "fedgate_updates",
        "name": "digits/edge-1/" + UID,
        "sha256": hashlib.sha256(envelope).hexdigest(),
        "size": 1004,
    }
    assert UpdatePointer.decode(data) == pointer
    pointer.check(envelope)
    for bad in (envelope[:-1], envelope[:-1] + b"x"):
        with pytest.raises(TransportError) as info:
            pointer.check(bad)
        assert info.value.reason == "bad-pointer"


def _fields(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "bucket": "fedgate_updates",
        "name": "digits/edge-1/" + UID,
        "sha256": "0" * 64,
        "size": 10,
    }
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    return POINTER_MAGIC + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"FGUE{}",
        POINTER_MAGIC + b"not json",
        POINTER_MAGIC + b"[]",
        _fields(size=0),
        _fields(size=-1),
        _fields(size="10"),
        _fields(size=True),
        _fields(size=10.0),
        _fields(sha256="A" * 64),
        _fields(name="../etc/passwd"),
        _fields(name="digits/edge-1/short"),
        _fields(bucket="a.b"),
        _fields(bucket=None),
        _fields(extra=1),
        _fields().replace(b",", b", ", 1),  # not canonical
        POINTER_MAGIC + b'{"bucket":"b","bucket":"b"}',
        POINTER_MAGIC + b" " * 2000,
    ],
)
def test_pointer_decoding_is_strict(data: bytes) -> None:
    with pytest.raises(TransportError) as info:
        UpdatePointer.decode(data)
    assert info.value.reason == "bad-pointer"


def test_inline_or_object_by_size() -> None:
    max_payload = 1024 * 1024
    assert fits_inline(max_payload - HEADER_ROOM, max_payload)
    assert not fits_inline(max_payload - HEADER_ROOM + 1, max_payload)
    assert not fits_inline(max_payload, max_payload)


def test_stream_spec_defaults_and_checks() -> None:
    spec = StreamSpec()
    assert spec.subjects == ("fedgate.updates.>",)
    assert spec.duplicate_window_s == 120.0 and spec.max_age_s >= spec.duplicate_window_s
    with pytest.raises(ValueError):
        StreamSpec(duplicate_window_s=10, max_age_s=5)
    with pytest.raises(ValueError):
        StreamSpec(replicas=2)
