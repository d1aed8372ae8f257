"""Opening an envelope in place: the payload is decrypted into the envelope's own buffer
(the trainer's copy of an update read from the object store), so a large update is in
memory once. The same envelopes open to the same payloads and every tampering is refused
with the same reason as when the payload goes to a buffer of its own."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from fedcore.envelope import open_update, seal_update
from fedcore.errors import EnvelopeError
from tests.test_envelope import (
    BASE,
    EDGE,
    KEYS,
    PAYLOAD,
    TRAINER,
    WRAPPED_X25519,
    _flip,
    resign,
    seal,
    split,
)

MAX = 8 << 20


def open_in_place(data: bytes | bytearray) -> tuple[object, memoryview | bytearray]:
    return open_update(
        bytearray(data), recipient=TRAINER, edge_keys=KEYS.get, max_payload=MAX, in_place=True
    )


def reasons(data: bytes) -> tuple[str | None, str | None]:
    """(copying reason, in-place reason); None where it opened."""
    out: list[str | None] = []
    for in_place in (False, True):
        try:
            open_update(
                bytearray(data),
                recipient=TRAINER,
                edge_keys=KEYS.get,
                max_payload=MAX,
                in_place=in_place,
            )
            out.append(None)
        except EnvelopeError as exc:
            out.append(exc.reason)
    return out[0], out[1]


def large(size: int) -> bytes:
    """A payload in default (1 MiB) chunks, so the body is hashed in the digest thread."""
    _, data = seal_update(
        os.urandom(size),
        recipient=TRAINER.public_key(),
        signer=EDGE,
        model="digits",
        round=0,
        edge_id="edge-1",
        base_version=0,
        base_digest=BASE,
    )
    return bytes(data)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 200])
def test_in_place_opens_to_the_same_payload_as_a_view_of_the_buffer(size: int) -> None:
    data = bytearray(seal(PAYLOAD[:size]))
    header, payload = open_update(
        data, recipient=TRAINER, edge_keys=KEYS.get, max_payload=MAX, in_place=True
    )
    assert bytes(payload) == PAYLOAD[:size]
    assert isinstance(payload, memoryview) and payload.obj is data
    assert header.payload_len == size


def test_large_payload_opens_in_place_beside_the_digest_thread() -> None:
    """Chunks are overwritten only once the digest thread has hashed them: were one
    overwritten first, the signature of this valid envelope would fail."""
    data = large(5 * 1024 * 1024 + 7)
    copied = open_update(data, recipient=TRAINER, edge_keys=KEYS.get, max_payload=MAX)[1]
    assert bytes(open_in_place(data)[1]) == bytes(copied)


def test_in_place_allocates_no_buffer_of_the_payload_size() -> None:
    data = bytearray(large(4 * 1024 * 1024))
    tracemalloc.start()
    try:
        open_update(data, recipient=TRAINER, edge_keys=KEYS.get, max_payload=MAX, in_place=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 1024 * 1024, peak  # one chunk of scratch, not the 4 MiB payload


def test_every_single_bit_flip_is_refused_in_place_with_the_same_reason() -> None:
    data = seal(PAYLOAD[:40], chunk_size=16)
    for at in range(len(data)):
        copying, in_place = reasons(_flip(data, at, at % 8))
        assert copying is not None and in_place == copying, at


def test_large_payload_tampering_is_refused_in_place() -> None:
    data = large(3 * 1024 * 1024 + 5)
    header, _, _, _ = split(data)
    body_at = 9 + len(header) + 64
    chunk_1 = body_at + WRAPPED_X25519 + 1024 * 1024 + 16 + 7
    for at in (body_at + 3, chunk_1, len(data) - 1, 9 + len(header) + 1):
        assert reasons(_flip(data, at)) == ("bad-signature", "bad-signature"), at


@pytest.mark.parametrize("chunk", [0, 2, 3])
def test_flipped_ciphertext_signed_again_fails_decryption_in_place(chunk: int) -> None:
    header, _, wrapped, chunks = split(seal())
    chunks[chunk] = _flip(chunks[chunk], 5)
    with pytest.raises(EnvelopeError) as info:
        open_in_place(resign(header, wrapped, chunks))
    assert str(info.value) == (
        f"update rejected (decrypt-failed): chunk {chunk} of 4 fails authentication"
    )


def test_wrapped_key_signed_again_does_not_unwrap_in_place() -> None:
    header, _, wrapped, chunks = split(seal())
    assert reasons(resign(header, _flip(wrapped, 40), chunks)) == (
        "decrypt-failed",
        "decrypt-failed",
    )


def test_in_place_needs_a_writable_buffer() -> None:
    with pytest.raises(ValueError, match="writable"):
        open_update(seal(), recipient=TRAINER, edge_keys=KEYS.get, max_payload=MAX, in_place=True)


def test_a_payload_opened_in_place_is_aligned_for_float32() -> None:
    """The payload starts on a 16-byte boundary of the buffer (within the wrapped key,
    consumed before any chunk is written), whatever the header's length: a vector over it
    is aligned, so numpy neither copies it (``tofile``: a spill of the warm-up) nor works
    on it unaligned."""
    import numpy as np

    for edge_id in (f"e{'x' * n}" for n in range(16)):  # every header length modulo 16
        data = bytearray(seal(PAYLOAD[:192], edge_id=edge_id))
        _, payload = open_update(
            data,
            recipient=TRAINER,
            edge_keys=lambda _: EDGE.public_key(),
            max_payload=MAX,
            in_place=True,
        )
        vector = np.frombuffer(payload, dtype="<f4")
        assert vector.ctypes.data % 16 == 0 and vector.flags.aligned, edge_id
        assert vector.tobytes() == PAYLOAD[:192]


@pytest.mark.parametrize("size", [200, 3 * 1024 * 1024 + 5])
def test_a_refused_envelope_leaves_no_plaintext_in_the_buffer(size: int) -> None:
    """In place, chunks are decrypted into the caller's buffer before the signature is
    checked: on a refusal that region is zeroed (before, the plaintext stayed there)."""
    secret = (b"plaintext-" * (size // 10 + 1))[:size]
    data = seal(secret, chunk_size=64) if size < 1024 else seal(secret)
    header, _, _, _ = split(data)
    buffer = bytearray(_flip(data, 9 + len(header) + 1))  # in the signature
    with pytest.raises(EnvelopeError, match="bad-signature"):
        open_update(buffer, recipient=TRAINER, edge_keys=KEYS.get, max_payload=MAX,
                    in_place=True)  # fmt: skip
    assert b"plaintext-" not in buffer
