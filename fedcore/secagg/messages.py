"""Secure-aggregation messages: frozen dataclasses with canonical byte encodings.

Flow of one round (``S`` trainer, ``E`` each edge; the transport is not our concern, but
it must authenticate which edge sent what, as the sealed update envelope does):

1. ``S -> E`` :class:`RoundSetup` (public: round id and seed, participants, settings).
2. ``E -> S`` :class:`KeyAdvert` (two fresh X25519 keys and a seed commitment, signed with
   the edge's enrolled Ed25519 key); ``S -> E`` :class:`AdvertBundle` (the neighbours').
3. ``E -> S`` :class:`ShareBundle` (Shamir shares, AES-GCM-encrypted to each neighbour);
   ``S -> E`` :class:`ShareDelivery` (the shares addressed to that edge).
4. ``E -> S`` :class:`MaskedInput` (quantised update plus masks, modulo 2**32, and the
   neighbours whose shares failed to open).
5. ``S -> E`` :class:`SurvivorList`; ``E -> S`` :class:`SurvivorSignature`.
6. ``S -> E`` :class:`UnmaskRequest`; ``E -> S`` :class:`UnmaskResponse`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives import hashes

from fedcore.errors import ConfigError, SecAggError
from fedcore.secagg.codec import Reader, Writer
from fedcore.secagg.config import SecAggConfig

KEY_BYTES = 32
SIG_BYTES = 64
NONCE_BYTES = 12


def _fixed(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise SecAggError("malformed", f"{what} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class RoundSetup:
    """The public description of a round; its digest is bound into every signature."""

    KIND: ClassVar[int] = 1
    round_id: str
    round_seed: bytes
    participants: tuple[str, ...]
    dim: int
    config: SecAggConfig

    def to_bytes(self) -> bytes:
        c = self.config
        w = Writer().header(self.KIND).text(self.round_id).blob(self.round_seed)
        w.texts(self.participants).u64(self.dim).f64(c.threshold).f64(c.clip_norm)
        w.u64(c.neighbours or 0).u64(c.quant_bits or 0).u8(int(c.stochastic_rounding))
        dropout = c.expected_dropout
        return w.u8(dropout is not None).f64(0.0 if dropout is None else dropout).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundSetup:
        r = Reader(data, "RoundSetup").header(cls.KIND)
        round_id, seed, participants, dim = r.text(), r.blob(), r.texts(), r.u64()
        threshold, clip, k, bits, stochastic = r.f64(), r.f64(), r.u64(), r.u64(), r.flag()
        has_dropout, dropout = r.flag(), r.f64()
        r.end()
        if not has_dropout and struct.pack(">d", dropout) != bytes(8):
            raise SecAggError("malformed", "RoundSetup: dropout value without its flag")
        try:
            config = SecAggConfig(
                threshold=threshold,
                clip_norm=clip,
                neighbours=k or None,
                quant_bits=bits or None,
                stochastic_rounding=stochastic,
                expected_dropout=dropout if has_dropout else None,
            )
        except ConfigError as exc:
            raise SecAggError("malformed", f"RoundSetup: {exc}") from None
        return cls(round_id, _fixed(seed, 32, "round seed"), participants, dim, config)

    def digest(self) -> bytes:
        """SHA-256 of the encoding: what adverts and survivor signatures are bound to."""
        h = hashes.Hash(hashes.SHA256())
        h.update(self.to_bytes())
        return h.finalize()


@dataclass(frozen=True)
class KeyAdvert:
    """An edge's per-round public keys, signed with its enrolled Ed25519 identity."""

    KIND: ClassVar[int] = 2
    round_id: str
    edge: str
    cipher_pk: bytes
    mask_pk: bytes
    seed_commitment: bytes
    signature: bytes

    def write(self, w: Writer) -> Writer:
        w.text(self.round_id).text(self.edge).blob(self.cipher_pk).blob(self.mask_pk)
        return w.blob(self.seed_commitment).blob(self.signature)

    @classmethod
    def read(cls, r: Reader) -> KeyAdvert:
        round_id, edge = r.text(), r.text()
        cipher_pk = _fixed(r.blob(), KEY_BYTES, "cipher key")
        mask_pk = _fixed(r.blob(), KEY_BYTES, "mask key")
        commitment = _fixed(r.blob(), KEY_BYTES, "seed commitment")
        signature = _fixed(r.blob(), SIG_BYTES, "signature")
        return cls(round_id, edge, cipher_pk, mask_pk, commitment, signature)

    def to_bytes(self) -> bytes:
        return self.write(Writer().header(self.KIND)).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvert:
        r = Reader(data, "KeyAdvert").header(cls.KIND)
        advert = cls.read(r)
        r.end()
        return advert


@dataclass(frozen=True)
class AdvertBundle:
    """The verified adverts of one edge's neighbours, relayed by the server."""

    KIND: ClassVar[int] = 3
    round_id: str
    recipient: str
    adverts: tuple[KeyAdvert, ...]

    def to_bytes(self) -> bytes:
        w = Writer().header(self.KIND).text(self.round_id).text(self.recipient)
        w.count(len(self.adverts))
        for a in self.adverts:
            a.write(w)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertBundle:
        r = Reader(data, "AdvertBundle").header(cls.KIND)
        round_id, recipient = r.text(), r.text()
        adverts = tuple(KeyAdvert.read(r) for _ in range(r.count()))
        r.end()
        return cls(round_id, recipient, adverts)


@dataclass(frozen=True)
class EncryptedShare:
    """Shares of ``sender``'s seed and mask key for ``recipient``, under AES-256-GCM."""

    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes

    def write(self, w: Writer) -> Writer:
        return w.text(self.sender).text(self.recipient).blob(self.nonce).blob(self.ciphertext)

    @classmethod
    def read(cls, r: Reader) -> EncryptedShare:
        sender, recipient = r.text(), r.text()
        nonce = _fixed(r.blob(), NONCE_BYTES, "nonce")
        return cls(sender, recipient, nonce, r.blob())


@dataclass(frozen=True)
class ShareBundle:
    """Everything one edge shares (edge to server), or receives (server to edge)."""

    KIND: ClassVar[int] = 4
    round_id: str
    edge: str
    shares: tuple[EncryptedShare, ...]

    def to_bytes(self) -> bytes:
        w = Writer().header(self.KIND).text(self.round_id).text(self.edge)
        w.count(len(self.shares))
        for s in self.shares:
            s.write(w)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        r = Reader(data, "ShareBundle").header(cls.KIND)
        round_id, edge = r.text(), r.text()
        shares = tuple(EncryptedShare.read(r) for _ in range(r.count()))
        r.end()
        return cls(round_id, edge, shares)


# The server forwards the same structure, addressed to the recipient (``edge``).
ShareDelivery = ShareBundle


@dataclass(frozen=True)
class MaskedInput:
    """An edge's quantised update plus its masks, little-endian uint32.

    ``excluded``: the neighbours whose shares this edge could not open or check (sorted);
    it holds no share of theirs and did not mask with them, and the server treats them as
    dropped (their own masked inputs are left out of the sum).
    """

    KIND: ClassVar[int] = 5
    round_id: str
    edge: str
    values: bytes
    excluded: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        w = Writer().header(self.KIND).text(self.round_id).text(self.edge).blob(self.values)
        return w.texts(self.excluded).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        r = Reader(data, "MaskedInput").header(cls.KIND)
        msg = cls(r.text(), r.text(), r.blob(), r.texts())
        r.end()
        if list(msg.excluded) != sorted(set(msg.excluded)):
            raise SecAggError("malformed", "MaskedInput: excluded must be sorted and unique")
        return msg


@dataclass(frozen=True)
class SurvivorList:
    """The edges whose masked input the server holds (sorted)."""

    KIND: ClassVar[int] = 6
    round_id: str
    survivors: tuple[str, ...]

    def to_bytes(self) -> bytes:
        return Writer().header(self.KIND).text(self.round_id).texts(self.survivors).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> SurvivorList:
        r = Reader(data, "SurvivorList").header(cls.KIND)
        msg = cls(r.text(), r.texts())
        r.end()
        return msg


@dataclass(frozen=True)
class SurvivorSignature:
    """An edge's Ed25519 signature over the round digest and the survivor list."""

    KIND: ClassVar[int] = 7
    round_id: str
    edge: str
    signature: bytes

    def write(self, w: Writer) -> Writer:
        return w.text(self.round_id).text(self.edge).blob(self.signature)

    @classmethod
    def read(cls, r: Reader) -> SurvivorSignature:
        round_id, edge = r.text(), r.text()
        return cls(round_id, edge, _fixed(r.blob(), SIG_BYTES, "signature"))

    def to_bytes(self) -> bytes:
        return self.write(Writer().header(self.KIND)).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> SurvivorSignature:
        r = Reader(data, "SurvivorSignature").header(cls.KIND)
        msg = cls.read(r)
        r.end()
        return msg


@dataclass(frozen=True)
class UnmaskRequest:
    """Which share of which neighbour the server asks ``recipient`` to reveal.

    ``self_mask_peers``: survivors whose self-mask seed share is wanted; ``mask_key_peers``:
    edges that dropped after sharing, whose mask-key share is wanted. ``signatures`` are
    the recipient's neighbours' signatures over ``survivors``.
    """

    KIND: ClassVar[int] = 8
    round_id: str
    recipient: str
    survivors: tuple[str, ...]
    signatures: tuple[SurvivorSignature, ...]
    self_mask_peers: tuple[str, ...]
    mask_key_peers: tuple[str, ...]

    def to_bytes(self) -> bytes:
        w = Writer().header(self.KIND).text(self.round_id).text(self.recipient)
        w.texts(self.survivors).count(len(self.signatures))
        for s in self.signatures:
            s.write(w)
        return w.texts(self.self_mask_peers).texts(self.mask_key_peers).finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = Reader(data, "UnmaskRequest").header(cls.KIND)
        round_id, recipient, survivors = r.text(), r.text(), r.texts()
        signatures = tuple(SurvivorSignature.read(r) for _ in range(r.count()))
        msg = cls(round_id, recipient, survivors, signatures, r.texts(), r.texts())
        r.end()
        return msg


@dataclass(frozen=True)
class PeerShare:
    """One revealed Shamir share (66-byte y value) of ``peer``'s secret."""

    peer: str
    value: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """The shares an edge reveals: self-mask seed shares and mask-key shares, and, for each
    peer whose mask-key share it reveals (a dropped neighbour), the key of the pairwise
    mask it added with that peer (``pair_keys``, 32 bytes each): the server's fallback
    when too few right shares of that peer's key come back."""

    KIND: ClassVar[int] = 9
    round_id: str
    edge: str
    self_mask_shares: tuple[PeerShare, ...]
    mask_key_shares: tuple[PeerShare, ...]
    pair_keys: tuple[PeerShare, ...] = ()

    def to_bytes(self) -> bytes:
        w = Writer().header(self.KIND).text(self.round_id).text(self.edge)
        for group in (self.self_mask_shares, self.mask_key_shares, self.pair_keys):
            w.count(len(group))
            for s in group:
                w.text(s.peer).blob(s.value)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = Reader(data, "UnmaskResponse").header(cls.KIND)
        round_id, edge = r.text(), r.text()
        groups = [tuple(PeerShare(r.text(), r.blob()) for _ in range(r.count())) for _ in range(3)]
        r.end()
        return cls(round_id, edge, groups[0], groups[1], groups[2])
