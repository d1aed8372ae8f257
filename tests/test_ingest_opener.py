"""The update opener on its own: no broker, no ledger, no acknowledgement.

Real keys (``fedgate keys`` layout), real sealed envelopes; the object store is a dict.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import CodecError, EnvelopeError, TransportError
from fedcore.keys import generate_x25519
from fedcore.transport import UpdatePointer, sha256_hex, update_object_name, update_subject
from tests.transport_harness import DIM, TARGET, Keys, make_keys, seal
from trainer.opener import FixedRound, OpenedUpdate, Refused, UpdateOpener, WireObserver
from trainer.registry import RegistryFile

SUBJECT = update_subject(TARGET.model, "edge-1")


class DictObjects:
    """An object source over a dict (name to bytes)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def read(self, pointer: UpdatePointer) -> bytearray:
        if pointer.name not in self.objects:
            raise Refused("object-missing", pointer.name)
        return bytearray(self.objects[pointer.name])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def _opener(
    keys: Keys, objects: DictObjects | None = None, on_wire: WireObserver | None = None
) -> UpdateOpener:
    return UpdateOpener(
        recipient=keys.trainer,
        edges=RegistryFile(keys.layout.registry),
        objects=objects or DictObjects(),
        max_update_bytes=1 << 20,
        on_wire=on_wire,
    )


def _open(opener: UpdateOpener, envelope: bytes, subject: str = SUBJECT) -> OpenedUpdate:
    return asyncio.run(opener.open(subject, envelope, FixedRound(TARGET)))


def _reason(opener: UpdateOpener, envelope: bytes, subject: str = SUBJECT) -> tuple[type, str]:
    with pytest.raises((Refused, EnvelopeError, TransportError)) as err:
        _open(opener, envelope, subject)
    return type(err.value), str(getattr(err.value, "reason", ""))


def test_a_good_update_opens_to_its_header_vector_and_digest(keys: Keys) -> None:
    delta = np.linspace(-1, 1, DIM, dtype=np.float32)
    update_id, envelope = seal(keys, delta)
    opened = _open(_opener(keys), envelope)
    assert opened.header.update_id == update_id
    assert opened.header.edge_id == "edge-1" and opened.header.round == TARGET.round
    assert np.array_equal(opened.vector, delta)
    assert opened.digest == sha256_hex(envelope)


def test_a_pointer_opens_through_the_object_source(keys: Keys) -> None:
    delta = np.full(DIM, 0.5, dtype=np.float32)
    update_id, envelope = seal(keys, delta)
    objects = DictObjects()
    name = update_object_name(TARGET.model, "edge-1", update_id)
    objects.objects[name] = envelope
    seen: list[tuple[int, str]] = []
    opener = _opener(keys, objects, lambda size, path: seen.append((size, path)))
    pointer = UpdatePointer.for_envelope(envelope, opener.object_bucket, name)
    opened = _open(opener, pointer.encode())
    assert opened.header.update_id == update_id and np.array_equal(opened.vector, delta)
    assert seen == [(len(envelope), "object")]
    objects.objects[name] = envelope[:-1] + bytes([envelope[-1] ^ 1])  # not what it names
    assert _reason(opener, pointer.encode()) == (TransportError, "bad-pointer")


def test_a_tampered_signature_is_refused_as_bad_signature(keys: Keys) -> None:
    _, envelope = seal(keys, np.zeros(DIM, dtype=np.float32))
    tampered = bytearray(envelope)
    tampered[-1] ^= 0x01  # the signature is the envelope's last bytes
    assert _reason(_opener(keys), bytes(tampered)) == (EnvelopeError, "bad-signature")


def test_a_key_the_registry_does_not_hold_is_refused(keys: Keys) -> None:
    # signed by edge-2's key in edge-1's name: the signature does not verify
    _, envelope = seal(keys, np.zeros(DIM, dtype=np.float32), signer=keys.edges["edge-2"])
    assert _reason(_opener(keys), envelope) == (EnvelopeError, "bad-signature")
    # an edge that is not enrolled at all
    _, envelope = seal(keys, np.zeros(DIM, dtype=np.float32), edge="edge-2")
    subject = update_subject(TARGET.model, "edge-2")
    assert _reason(_opener(keys), envelope, subject) == (EnvelopeError, "unknown-edge")


def test_an_update_sealed_to_another_trainer_does_not_decrypt(keys: Keys, tmp_path: Path) -> None:
    other = generate_x25519(tmp_path / "other-hpke.key")
    _, envelope = seal(keys, np.zeros(DIM, dtype=np.float32), recipient=other.public_key())
    assert _reason(_opener(keys), envelope) == (EnvelopeError, "decrypt-failed")


def test_a_bad_payload_is_refused_by_the_decoder(keys: Keys) -> None:
    _, short = seal(keys, np.zeros(DIM - 1, dtype=np.float32))
    assert _reason(_opener(keys), short) == (CodecError, "decode-error")
    nan = np.zeros(DIM, dtype=np.float32)
    nan[3] = np.nan
    _, envelope = seal(keys, nan)
    assert _reason(_opener(keys), envelope) == (CodecError, "non-finite")


def test_refusals_before_any_crypto(keys: Keys) -> None:
    opener = _opener(keys)
    _, revoked = seal(keys, np.zeros(DIM, dtype=np.float32), edge="edge-3")
    subject = update_subject(TARGET.model, "edge-3")
    assert _reason(opener, revoked, subject) == (Refused, "revoked-edge")
    _, envelope = seal(keys, np.zeros(DIM, dtype=np.float32))
    assert _reason(opener, envelope, "nonsense") == (TransportError, "bad-subject")
    other = update_subject(TARGET.model, "edge-3")
    assert _reason(opener, envelope, other) == (Refused, "subject-mismatch")
    small = UpdateOpener(
        recipient=keys.trainer,
        edges=RegistryFile(keys.layout.registry),
        objects=DictObjects(),
        max_update_bytes=len(envelope) - 1,
    )
    assert _reason(small, envelope) == (Refused, "oversize")
    with pytest.raises(Refused) as err:
        asyncio.run(opener.open(SUBJECT, envelope, FixedRound(None)))
    assert err.value.reason == "no-open-round"


def test_an_update_for_another_round_is_refused(keys: Keys) -> None:
    _, old = seal(keys, np.zeros(DIM, dtype=np.float32), round=TARGET.round - 1)
    assert _reason(_opener(keys), old) == (EnvelopeError, "stale-round")
