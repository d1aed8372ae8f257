"""Per-round key material and the signatures, key agreements and share encryption over it.

Each edge makes, per round, two X25519 key pairs (one to encrypt shares to its neighbours,
one to agree pairwise mask seeds) and a 32-byte self-mask seed; it advertises the public
keys and a commitment to the seed, signed with its enrolled Ed25519 identity over the round
digest. Pairwise mask keys and share-encryption keys come from X25519 through HKDF with the
round digest and both edge names in ``info``; shares travel under AES-256-GCM with the same
binding as associated data, so a share cannot be replayed to another pair or round.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcore.errors import SecAggError
from fedcore.secagg.codec import Writer
from fedcore.secagg.messages import NONCE_BYTES, KeyAdvert
from fedcore.secagg.prg import derive_key

_RAW = serialization.Encoding.Raw


def raw_public(key: x25519.X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def raw_private(key: x25519.X25519PrivateKey) -> bytes:
    """The raw 32-byte private key of ``key`` (what gets secret-shared)."""
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@dataclass(frozen=True)
class RoundKeys:
    """One edge's secrets for one round."""

    cipher: x25519.X25519PrivateKey = field(default_factory=x25519.X25519PrivateKey.generate)
    masking: x25519.X25519PrivateKey = field(default_factory=x25519.X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: os.urandom(32))


def seed_commitment(digest: bytes, edge: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, checked after the server reconstructs it."""
    h = hashes.Hash(hashes.SHA256())
    h.update(Writer().text("fedgate/secagg/v1/seed").blob(digest).text(edge).blob(seed).finish())
    return h.finalize()


def _advert_payload(digest: bytes, edge: str, cipher_pk: bytes, mask_pk: bytes, c: bytes) -> bytes:
    w = Writer().text("fedgate/secagg/v1/advert").blob(digest).text(edge)
    return w.blob(cipher_pk).blob(mask_pk).blob(c).finish()


def make_advert(
    identity: ed25519.Ed25519PrivateKey, keys: RoundKeys, round_id: str, digest: bytes, edge: str
) -> KeyAdvert:
    """The signed advertisement of ``keys`` for round ``digest``."""
    cipher_pk, mask_pk = raw_public(keys.cipher), raw_public(keys.masking)
    commitment = seed_commitment(digest, edge, keys.seed)
    signature = identity.sign(_advert_payload(digest, edge, cipher_pk, mask_pk, commitment))
    return KeyAdvert(round_id, edge, cipher_pk, mask_pk, commitment, signature)


def verify_advert(advert: KeyAdvert, signer: ed25519.Ed25519PublicKey, digest: bytes) -> None:
    """Check ``advert`` was signed by ``signer`` for this round; else ``bad-signature``."""
    payload = _advert_payload(
        digest, advert.edge, advert.cipher_pk, advert.mask_pk, advert.seed_commitment
    )
    try:
        signer.verify(advert.signature, payload)
    except InvalidSignature:
        raise SecAggError(
            "bad-signature", "key advertisement not signed by the enrolled key", advert.edge
        ) from None


def _exchange(private: x25519.X25519PrivateKey, peer_pk: bytes, peer: str) -> bytes:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError:
        raise SecAggError("bad-key", "X25519 agreement with this key failed", peer) from None


def pair_mask_key(
    private: x25519.X25519PrivateKey, peer_pk: bytes, digest: bytes, a: str, b: str
) -> bytes:
    """The AES key of the pairwise mask between edges ``a`` and ``b`` (order-free)."""
    lo, hi = sorted((a, b))
    shared = _exchange(private, peer_pk, b if a == lo else a)
    return derive_key(shared, "pair-mask", digest, lo, hi)


def self_mask_key(seed: bytes, digest: bytes, edge: str) -> bytes:
    """The AES key of ``edge``'s self mask."""
    return derive_key(seed, "self-mask", digest, edge)


def _share_binding(digest: bytes, sender: str, recipient: str) -> bytes:
    w = Writer().text("fedgate/secagg/v1/share").blob(digest)
    return w.text(sender).text(recipient).finish()


def encrypt_share(
    private: x25519.X25519PrivateKey,
    peer_pk: bytes,
    digest: bytes,
    sender: str,
    recipient: str,
    plaintext: bytes,
) -> tuple[bytes, bytes]:
    """AES-256-GCM-encrypt ``plaintext`` from ``sender`` to ``recipient``: (nonce, ciphertext)."""
    key = derive_key(_exchange(private, peer_pk, recipient), "share", digest, sender, recipient)
    nonce = os.urandom(NONCE_BYTES)
    binding = _share_binding(digest, sender, recipient)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, binding)


def decrypt_share(
    private: x25519.X25519PrivateKey,
    peer_pk: bytes,
    digest: bytes,
    sender: str,
    recipient: str,
    nonce: bytes,
    ciphertext: bytes,
) -> bytes:
    """Decrypt a share ``sender`` encrypted to ``recipient``; ``bad-share`` if tampered."""
    key = derive_key(_exchange(private, peer_pk, sender), "share", digest, sender, recipient)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _share_binding(digest, sender, recipient))
    except InvalidTag:
        raise SecAggError("bad-share", "share ciphertext failed authentication", sender) from None


def survivor_payload(digest: bytes, survivors: Sequence[str]) -> bytes:
    """What survivor signatures cover: the round digest and the sorted survivor list."""
    w = Writer().text("fedgate/secagg/v1/survivors").blob(digest)
    return w.texts(tuple(survivors)).finish()


def sign_survivors(identity: ed25519.Ed25519PrivateKey, payload: bytes) -> bytes:
    """Sign a :func:`survivor_payload`."""
    return identity.sign(payload)


def survivors_signed(signer: ed25519.Ed25519PublicKey, signature: bytes, payload: bytes) -> bool:
    """Whether ``signature`` is ``signer``'s over the :func:`survivor_payload` ``payload``."""
    try:
        signer.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


def public_matches(private_raw: bytes, public_raw: bytes) -> bool:
    """Whether a reconstructed X25519 private key belongs to the advertised public key."""
    key = x25519.X25519PrivateKey.from_private_bytes(private_raw)
    return raw_public(key) == public_raw
