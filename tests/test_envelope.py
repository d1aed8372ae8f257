"""The sealed update envelope: round trips, and every kind of tampering refused with its reason.

Offsets and the signature are recomputed here from the documented layout, so these tests
also pin the wire format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.envelope import (
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    BytesLike,
    UpdateHeader,
    check_header,
    generate_recipient_key,
    open_update,
    read_header_unverified,
    seal_update,
)
from fedcore.errors import EnvelopeError

EDGE = ed25519.Ed25519PrivateKey.generate()
EDGE2 = ed25519.Ed25519PrivateKey.generate()
KEYS = {"edge-1": EDGE.public_key(), "edge-2": EDGE2.public_key()}
TRAINER = generate_recipient_key(SUITE_X25519)
BASE = hashlib.sha256(b"base model v2").hexdigest()
PAYLOAD = bytes(range(200))  # 4 chunks of 64: 64, 64, 64, 8
CHUNK = 64
WRAPPED_X25519 = 32 + 32 + 16  # HPKE enc, content key, tag
MAX = 1 << 20


def seal(payload: bytes = PAYLOAD, signer=EDGE, **fields) -> bytes:
    args = {
        "recipient": TRAINER.public_key(),
        "signer": signer,
        "model": "digits",
        "round": 3,
        "edge_id": "edge-1",
        "base_version": 2,
        "base_digest": BASE,
        "chunk_size": CHUNK,
        "num_samples": 120,
    }
    args.update(fields)
    return bytes(seal_update(payload, **args)[1])


def open_(data: BytesLike, recipient=TRAINER, max_payload: int = MAX):
    return open_update(data, recipient=recipient, edge_keys=KEYS.get, max_payload=max_payload)


def reason(data: bytes, **kw) -> str:
    with pytest.raises(EnvelopeError) as info:
        open_(data, **kw)
    return info.value.reason


def split(data: bytes) -> tuple[bytes, bytes, bytes, list[bytes]]:
    """(header, signature, wrapped key, chunks) of an X25519 envelope, by the layout."""
    (header_len,) = struct.unpack_from(">I", data, 5)
    header = data[9 : 9 + header_len]
    h = json.loads(header)
    sig_at = 9 + header_len
    wrapped = data[sig_at + 64 : sig_at + 64 + WRAPPED_X25519]
    at = sig_at + 64 + WRAPPED_X25519
    chunks = []
    for i in range(h["chunk_count"]):
        plain = min(h["chunk_size"], h["payload_len"] - i * h["chunk_size"])
        chunks.append(data[at : at + plain + 16])
        at += plain + 16
    assert at == len(data)
    return header, data[sig_at : sig_at + 64], wrapped, chunks


def join(header: bytes, sig: bytes, wrapped: bytes, chunks: list[bytes]) -> bytes:
    return b"FGUE\x01" + struct.pack(">I", len(header)) + header + sig + wrapped + b"".join(chunks)


def resign(header: bytes, wrapped: bytes, chunks: list[bytes], key=EDGE) -> bytes:
    """Sign as the edge would: over SHA-256(context || header) and SHA-256(body)."""
    header_digest = hashlib.sha256(b"fedgate/update/v1/header\x00" + header).digest()
    body_digest = hashlib.sha256(wrapped + b"".join(chunks)).digest()
    sig = key.sign(b"fedgate/update/v1/signature\x00" + header_digest + body_digest)
    return join(header, sig, wrapped, chunks)


def edit_header(data: bytes, **changes) -> bytes:
    """Re-encode the header canonically with fields changed (bypassing validation)."""
    header, sig, wrapped, chunks = split(data)
    fields = json.loads(header)
    fields.update(changes)
    new = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return join(new, sig, wrapped, chunks)


# --- round trips ---------------------------------------------------------------------------


def test_round_trip_exposes_header_fields() -> None:
    header, payload = open_(seal())
    assert payload == PAYLOAD
    assert (header.model, header.round, header.edge_id) == ("digits", 3, "edge-1")
    assert (header.base_version, header.base_digest) == (2, BASE)
    assert (header.payload_len, header.chunk_size, header.chunk_count) == (200, 64, 4)
    assert (header.suite, header.compression, header.num_samples) == (SUITE_X25519, "none", 120)
    assert len(header.update_id) == 32


def test_envelope_length_follows_the_layout() -> None:
    data = seal()
    header, _, _, chunks = split(data)
    assert data[:5] == b"FGUE\x01"
    assert [len(c) for c in chunks] == [80, 80, 80, 24]
    assert len(data) == 9 + len(header) + 64 + 80 + 200 + 4 * 16


def test_update_ids_are_fresh_and_can_be_given() -> None:
    a, b = open_(seal())[0], open_(seal())[0]
    assert a.update_id != b.update_id
    assert open_(seal(update_id="ab" * 16))[0].update_id == "ab" * 16


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=5 * 64 + 7),
    chunk_size=st.sampled_from([16, 64, 100]),
)
def test_round_trip_any_size(payload: bytes, chunk_size: int) -> None:
    data = seal(payload, chunk_size=chunk_size)
    header, opened = open_(data)
    assert opened == payload
    assert header.chunk_count == max(1, -(-len(payload) // chunk_size))
    assert len(data) == 9 + len(header.encode()) + 64 + 80 + len(payload) + 16 * header.chunk_count


def test_hybrid_post_quantum_suite_round_trips() -> None:
    pq = generate_recipient_key(SUITE_MLKEM768_X25519)
    assert isinstance(pq, hpke.MLKEM768X25519PrivateKey)
    header, data = seal_update(
        PAYLOAD,
        recipient=pq.public_key(),
        signer=EDGE,
        model="digits",
        round=3,
        edge_id="edge-1",
        base_version=2,
        base_digest=BASE,
        chunk_size=CHUNK,
        num_samples=120,
    )
    assert header.suite == SUITE_MLKEM768_X25519
    opened_header, payload = open_(bytes(data), recipient=pq)
    assert (opened_header, payload) == (header, PAYLOAD)
    # The hybrid encapsulation is 1120 bytes instead of 32; everything else is the same.
    assert len(data) - len(seal()) == 1120 - 32 + len(SUITE_MLKEM768_X25519) - len(SUITE_X25519)


def test_open_accepts_bytearray_and_memoryview() -> None:
    data = seal()
    assert open_(bytearray(data))[1] == PAYLOAD
    assert open_(memoryview(data))[1] == PAYLOAD


# --- bit flips -----------------------------------------------------------------------------


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[at] ^= 1 << bit
    return bytes(b)


def test_bit_flip_in_each_part_is_refused_with_its_reason() -> None:
    data = seal()
    header, _, _, _ = split(data)
    sig_at = 9 + len(header)
    body_at = sig_at + 64
    chunks_at = body_at + WRAPPED_X25519
    cases = {
        "magic": (0, "malformed"),
        "wire version": (4, "malformed"),
        "header length": (8, "malformed"),
        "header": (9 + header.index(b'"round":3') + 8, "bad-signature"),  # round 3 -> 2
        "signature": (sig_at + 10, "bad-signature"),
        "wrapped key enc": (body_at, "bad-signature"),
        "wrapped key tag": (chunks_at - 1, "bad-signature"),
        "first chunk": (chunks_at, "bad-signature"),
        "middle chunk": (chunks_at + 80 + 40, "bad-signature"),
        "last chunk tag": (len(data) - 1, "bad-signature"),
    }
    got = {part: reason(_flip(data, at)) for part, (at, _) in cases.items()}
    assert got == {part: want for part, (_, want) in cases.items()}


def test_every_single_bit_flip_is_refused() -> None:
    data = seal(PAYLOAD[:40], chunk_size=16)
    reasons = set()
    for at in range(len(data)):
        reasons.add(reason(_flip(data, at, at % 8)))
    assert reasons <= EnvelopeError.REASONS
    assert "bad-signature" in reasons and "malformed" in reasons


def test_flipped_ciphertext_signed_again_by_the_edge_fails_decryption() -> None:
    header, _, wrapped, chunks = split(seal())
    chunks[2] = _flip(chunks[2], 5)
    with pytest.raises(EnvelopeError) as info:
        open_(resign(header, wrapped, chunks))
    assert info.value.reason == "decrypt-failed"
    assert str(info.value) == "update rejected (decrypt-failed): chunk 2 of 4 fails authentication"


# --- header edits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("model", "digitz", "bad-signature"),
        ("round", 4, "bad-signature"),
        ("edge_id", "edge-2", "bad-signature"),  # another known edge: its key does not verify
        ("edge_id", "edge-9", "unknown-edge"),
        ("base_version", 1, "bad-signature"),
        ("base_digest", "0" * 64, "bad-signature"),
        ("update_id", "0" * 32, "bad-signature"),
        ("compression", "int8", "bad-signature"),
        ("num_samples", 100000, "bad-signature"),
        ("suite", "chacha-suite", "unsupported-suite"),
        ("suite", SUITE_MLKEM768_X25519, "truncated"),  # its key encapsulation is longer
        ("payload_len", 201, "truncated"),
        ("payload_len", 199, "malformed"),  # one byte after the end
        ("chunk_count", 5, "malformed"),
        ("chunk_size", 100, "malformed"),  # 2 chunks, header says 4
        ("format", 2, "malformed"),
        ("round", True, "malformed"),
        ("round", -1, "malformed"),
        ("edge_id", "Edge-1", "malformed"),
    ],
)
def test_edited_header_field_is_refused(field: str, value: object, want: str) -> None:
    assert reason(edit_header(seal(), **{field: value})) == want


def test_consistent_chunk_edit_is_refused_as_trailing_bytes() -> None:
    assert reason(edit_header(seal(), chunk_size=100, chunk_count=2)) == "malformed"


def test_header_edited_and_signed_again_does_not_unwrap_the_key() -> None:
    """The header digest is HPKE info: a re-signed header does not open the content key."""
    header, _, wrapped, chunks = split(seal())
    fields = json.loads(header)
    fields["round"] = 4
    new = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(EnvelopeError) as info:
        open_(resign(new, wrapped, chunks))
    assert str(info.value) == "update rejected (decrypt-failed): content key does not unwrap"


def test_oversize_payload_is_refused_before_any_crypto() -> None:
    with pytest.raises(EnvelopeError) as info:
        open_(seal(), max_payload=199)
    assert str(info.value) == "update rejected (oversize): payload_len 200 is over the limit 199"
    assert open_(seal(), max_payload=200)[1] == PAYLOAD


# --- truncation, reordering, duplication ----------------------------------------------------


@pytest.mark.parametrize("keep", [0, 3, 8, 9, 100, -1, -16, -24])
def test_truncated_envelope_is_refused(keep: int) -> None:
    data = seal()
    assert reason(data[:keep]) == "truncated"


def test_missing_last_chunk_is_truncated() -> None:
    header, sig, wrapped, chunks = split(seal())
    with pytest.raises(EnvelopeError) as info:
        open_(join(header, sig, wrapped, chunks[:-1]))
    assert info.value.reason == "truncated"
    assert str(info.value).endswith("header says " + str(len(seal())))


def test_truncated_stream_signed_again_is_refused() -> None:
    """An edge that signs a cut stream under a header that matches the cut still fails."""
    header, _, wrapped, chunks = split(seal())
    fields = json.loads(header) | {"payload_len": 192, "chunk_count": 3}
    new = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    assert reason(resign(new, wrapped, chunks[:3])) == "decrypt-failed"


def test_a_middle_chunk_does_not_authenticate_as_the_last() -> None:
    """STREAM: the last-chunk flag is in the nonce and the associated data."""
    data = seal()
    header, _, wrapped, chunks = split(data)
    header_digest = hashlib.sha256(b"fedgate/update/v1/header\x00" + header).digest()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    key = suite.decrypt(wrapped, TRAINER, info=b"fedgate/update/v1/content-key\x00" + header_digest)
    aead = AESGCM(key)

    def params(i: int, last: int) -> tuple[bytes, bytes]:
        tail = struct.pack(">IB", i, last)
        return header_digest[:7] + tail, header_digest + tail

    assert aead.decrypt(*_swap(params(2, 0), chunks[2])) == PAYLOAD[128:192]
    assert aead.decrypt(*_swap(params(3, 1), chunks[3])) == PAYLOAD[192:]
    with pytest.raises(InvalidTag):
        aead.decrypt(*_swap(params(2, 1), chunks[2]))


def _swap(params: tuple[bytes, bytes], chunk: bytes) -> tuple[bytes, bytes, bytes]:
    nonce, ad = params
    return nonce, chunk, ad


def test_reordered_chunks_are_refused() -> None:
    header, sig, wrapped, chunks = split(seal())
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    assert reason(join(header, sig, wrapped, swapped)) == "bad-signature"
    with pytest.raises(EnvelopeError) as info:
        open_(resign(header, wrapped, swapped))
    assert str(info.value) == "update rejected (decrypt-failed): chunk 0 of 4 fails authentication"


def test_duplicated_chunks_are_refused() -> None:
    header, sig, wrapped, chunks = split(seal())
    duplicated = [chunks[0], chunks[0], *chunks[2:]]
    assert reason(join(header, sig, wrapped, duplicated)) == "bad-signature"
    with pytest.raises(EnvelopeError) as info:
        open_(resign(header, wrapped, duplicated))
    assert str(info.value) == "update rejected (decrypt-failed): chunk 1 of 4 fails authentication"
    appended = join(header, sig, wrapped, [*chunks, chunks[0]])
    with pytest.raises(EnvelopeError) as info:
        open_(appended)
    assert info.value.reason == "malformed"
    assert str(info.value).endswith("80 after its end")


def test_chunks_from_another_update_are_refused() -> None:
    header, _, wrapped, chunks = split(seal())
    _, _, other_wrapped, other_chunks = split(seal())
    mixed = [chunks[0], other_chunks[1], *chunks[2:]]
    assert reason(resign(header, wrapped, mixed)) == "decrypt-failed"
    assert reason(resign(header, other_wrapped, chunks)) == "decrypt-failed"


# --- keys, rounds, replays -----------------------------------------------------------------


def test_unknown_edge_is_refused_with_exact_message() -> None:
    data = seal(edge_id="edge-7")
    with pytest.raises(EnvelopeError) as info:
        open_(data)
    assert str(info.value) == "update rejected (unknown-edge): no public key for edge 'edge-7'"


def test_update_signed_with_another_key_is_refused() -> None:
    forged = seal(signer=ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(EnvelopeError) as info:
        open_(forged)
    assert str(info.value) == (
        "update rejected (bad-signature): signature of edge 'edge-1' does not verify"
    )
    assert reason(seal(signer=EDGE2)) == "bad-signature"  # a real edge claiming to be edge-1


def test_update_for_another_trainer_key_does_not_decrypt() -> None:
    assert reason(seal(), recipient=generate_recipient_key(SUITE_X25519)) == "decrypt-failed"


def test_suite_mismatch_with_receiver_key_is_unsupported() -> None:
    pq = generate_recipient_key(SUITE_MLKEM768_X25519)
    with pytest.raises(EnvelopeError) as info:
        open_(seal(), recipient=pq)
    assert info.value.reason == "unsupported-suite"
    with pytest.raises(EnvelopeError, match="unsupported-suite"):
        generate_recipient_key("rsa-2048")


def test_recipient_must_be_a_kem_key() -> None:
    with pytest.raises(TypeError, match="Ed25519PublicKey is not an X25519"):
        seal(recipient=EDGE.public_key())


def _expect(**overrides):
    expected = {"model": "digits", "round": 3, "base_version": 2, "base_digest": BASE}
    expected.update(overrides)
    return expected


def test_check_header_accepts_the_open_round() -> None:
    header, _ = open_(seal())
    check_header(header, **_expect())


@pytest.mark.parametrize(
    ("overrides", "want", "message"),
    [
        ({"round": 4}, "stale-round", "update is for round 3, round 4 is open"),
        ({"round": 2}, "wrong-round", "update is for round 3, round 2 is open"),
        ({"model": "mnist"}, "wrong-model", "update is for model 'digits', expected 'mnist'"),
        (
            {"base_version": 3},
            "base-mismatch",
            f"update is based on version 2 ({BASE[:12]}), round 3 is based on version 3 "
            f"({BASE[:12]})",
        ),
        (
            {"base_digest": "f" * 64},
            "base-mismatch",
            f"update is based on version 2 ({BASE[:12]}), round 3 is based on version 2 "
            f"({'f' * 12})",
        ),
    ],
)
def test_replayed_or_misdirected_update_is_refused(overrides, want: str, message: str) -> None:
    """A valid update of round 3 replayed into round 4 opens, then check_header refuses it."""
    header, _ = open_(seal())
    with pytest.raises(EnvelopeError) as info:
        check_header(header, **_expect(**overrides))
    assert info.value.reason == want
    assert str(info.value) == f"update rejected ({want}): {message}"


# --- header encoding -------------------------------------------------------------------------


def _header(**changes) -> UpdateHeader:
    fields: dict[str, Any] = {
        "suite": SUITE_X25519,
        "model": "digits",
        "round": 1,
        "edge_id": "edge-1",
        "base_version": 0,
        "base_digest": BASE,
        "update_id": "0" * 32,
        "payload_len": 0,
        "chunk_size": 64,
        "chunk_count": 1,
        "compression": "none",
        "num_samples": 0,
    }
    fields.update(changes)
    return UpdateHeader(**fields)


def test_header_encoding_is_canonical_and_decodes_back() -> None:
    h = _header()
    raw = h.encode()
    assert raw.startswith(b'{"base_digest":"') and b" " not in raw
    assert UpdateHeader.decode(raw) == h


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"\xff",
        b'{"a":1}',
    ],
)
def test_header_garbage_is_malformed(raw: bytes) -> None:
    with pytest.raises(EnvelopeError) as info:
        UpdateHeader.decode(raw)
    assert info.value.reason == "malformed"


def test_non_canonical_header_bytes_are_malformed() -> None:
    raw = _header().encode()
    fields = json.loads(raw)
    spaced = json.dumps(fields, sort_keys=True).encode()
    unsorted = json.dumps(dict(reversed(list(fields.items()))), separators=(",", ":")).encode()
    duplicated = raw[:-1] + b',"round":1}'
    extra = json.dumps(fields | {"x": 1}, sort_keys=True, separators=(",", ":")).encode()
    for bad in (spaced, unsorted, duplicated, extra):
        with pytest.raises(EnvelopeError) as info:
            UpdateHeader.decode(bad)
        assert info.value.reason == "malformed", bad


def test_seal_refuses_invalid_fields() -> None:
    with pytest.raises(EnvelopeError, match="chunk_size 8 is outside"):
        seal(chunk_size=8)
    with pytest.raises(EnvelopeError, match="header field edge_id"):
        seal(edge_id="Edge One")


def test_read_header_unverified_parses_without_keys() -> None:
    data = seal()
    assert read_header_unverified(data) == open_(data)[0]
    assert dataclasses.replace(read_header_unverified(data), round=9).round == 9


def test_envelope_error_refuses_unknown_reasons() -> None:
    with pytest.raises(ValueError, match="undeclared reason"):
        EnvelopeError("nope", "x")


def test_large_payload_in_default_chunks_round_trips() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)
    header, data = seal_update(
        payload,
        recipient=TRAINER.public_key(),
        signer=EDGE,
        model="digits",
        round=0,
        edge_id="edge-1",
        base_version=0,
        base_digest=BASE,
    )
    assert header.chunk_count == 4
    assert open_(bytes(data), max_payload=4 << 20)[1] == payload


def _large(size: int = 3 * 1024 * 1024 + 5) -> tuple[bytes, bytes]:
    payload = os.urandom(size)
    _, data = seal_update(
        payload,
        recipient=TRAINER.public_key(),
        signer=EDGE,
        model="digits",
        round=0,
        edge_id="edge-1",
        base_version=0,
        base_digest=BASE,
    )
    return payload, bytes(data)


def test_large_payload_tampering_is_refused_while_hashed_beside_the_cipher() -> None:
    """Bodies over 256 KiB are hashed in the digest thread: same reasons as inline."""
    _, data = _large()
    header, _, _, _ = split(data)
    body_at = 9 + len(header) + 64
    chunk_1 = body_at + WRAPPED_X25519 + 1024 * 1024 + 16 + 7
    for at in (body_at + 3, chunk_1, len(data) - 1, 9 + len(header) + 1):
        assert reason(_flip(data, at), max_payload=4 << 20) == "bad-signature", at


def test_a_forked_child_seals_with_its_own_digest_thread() -> None:
    """The digest pool's thread does not survive fork: the child must start its own."""
    import signal

    payload = os.urandom(600_000)
    seal(payload, chunk_size=65536)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(10)
        try:
            ok = open_(seal(payload, chunk_size=65536), max_payload=1 << 20)[1] == payload
        finally:
            os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
