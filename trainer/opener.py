"""Opening a sealed update: resolve, verify, decrypt, decode. No acknowledgement here.

:class:`UpdateOpener` turns one message of the updates stream (its subject and bytes) into
an :class:`OpenedUpdate`, or refuses it with a typed exception:

1. the subject names the model and the edge (``TransportError`` ``bad-subject``);
2. a pointer message is resolved through an :class:`ObjectSource` (size limit first, then
   size and SHA-256 against the pointer): :class:`Refused` ``oversize``, ``bad-pointer``,
   ``object-missing``;
3. a revoked edge is refused before any crypto (``revoked-edge``); ``open_update``
   verifies the edge's signature and decrypts with the trainer's HPKE key
   (``EnvelopeError``: ``unknown-edge``, ``bad-signature``, ``decrypt-failed``, ...);
   the signed header must name the subject's model and edge (``subject-mismatch``);
4. the header is checked against the round open now (``no-open-round``, or the
   :class:`RoundTarget`'s ``EnvelopeError``), then the payload is decoded at its fixed
   dtype (``EnvelopeError`` ``bad-payload``, ``non-finite``).

The opener talks to no broker itself: :class:`StoreObjects` is the object source over the
NATS object store, and a test passes its own. Recording, folding and acknowledging are
the consumer's (:mod:`trainer.ingest`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import nats.js.errors
from nats.js import JetStreamContext

from fedcore.compression import Vector, decode_update
from fedcore.enrollment import EdgeRegistry, EdgeStatus
from fedcore.envelope import (
    BytesLike,
    RecipientPrivateKey,
    UpdateHeader,
    check_header,
    open_update,
    read_header_unverified,
)
from fedcore.errors import ReasonedError
from fedcore.transport import (
    UPDATES_OBJECT_BUCKET,
    UpdatePointer,
    is_pointer,
    parse_update_subject,
    sha256_hex,
)
from trainer.errors import TrainerReason

RefusedReason = Literal[
    "oversize",
    "bad-pointer",
    "object-missing",
    "revoked-edge",
    "subject-mismatch",
    "no-open-round",
    "second-update",  # the consumer's: the ledger holds another update of the edge
    "fold-failed",  # the consumer's: the aggregator failed
    TrainerReason,  # the consumer's: the aggregator's refusal, passed on
]


class Refused(ReasonedError[RefusedReason]):
    """An update is refused for ``reason`` (besides ``EnvelopeError``/``TransportError``)."""


@dataclass(frozen=True)
class RoundTarget:
    """The round open for a model: what an update must be for, and its tensor sizes.

    :meth:`check` is strict (this round, this base model); a buffered asynchronous round
    that accepts stale bases can pass a subclass whose ``check`` says so.
    """

    model: str
    round: int
    base_version: int
    base_digest: str
    sizes: tuple[int, ...]

    def check(self, header: UpdateHeader) -> None:
        """Raise ``EnvelopeError`` (wrong-model, stale-round, wrong-round, base-mismatch)
        unless the verified ``header`` belongs to this round."""
        check_header(
            header,
            model=self.model,
            round=self.round,
            base_version=self.base_version,
            base_digest=self.base_digest,
        )


class RoundSource(Protocol):
    """Which round of ``model`` is open now (``None``: none is)."""

    def target(self, model: str) -> RoundTarget | None: ...


@dataclass(frozen=True)
class FixedRound:
    """A :class:`RoundSource` that names one round whatever the model (recovery, tests)."""

    round: RoundTarget | None

    def target(self, model: str) -> RoundTarget | None:
        return self.round


class EdgeDirectory(Protocol):
    """The edge registry in force now (``trainer.registry.RegistryFile`` is one)."""

    def current(self) -> EdgeRegistry: ...


class ObjectSource(Protocol):
    """Reads the envelope a pointer names; refuses (:class:`Refused`) one that is missing
    or not of the pointer's size."""

    async def read(self, pointer: UpdatePointer) -> bytearray: ...


@dataclass(frozen=True)
class OpenedUpdate:
    """A verified, decrypted, decoded update checked against its round (not recorded)."""

    header: UpdateHeader
    vector: Vector
    digest: str
    """SHA-256 of the envelope, as the ledger records it"""


WireObserver = Callable[[int, str], None]
"""Told each resolved envelope's size and path (``inline`` or ``object``)."""


class UpdateOpener:
    """Opens updates for a trainer's HPKE key against the edges' registry."""

    def __init__(
        self,
        *,
        recipient: RecipientPrivateKey,
        edges: EdgeDirectory,
        objects: ObjectSource,
        max_update_bytes: int,
        object_bucket: str = UPDATES_OBJECT_BUCKET,
        on_wire: WireObserver | None = None,
    ) -> None:
        self._recipient = recipient
        self._edges = edges
        self._objects = objects
        self.max_update_bytes = max_update_bytes
        self.object_bucket = object_bucket
        self._on_wire = on_wire

    async def open(self, subject: str, data: BytesLike, rounds: RoundSource) -> OpenedUpdate:
        """Open one message of the updates stream for the round ``rounds`` has open for
        its model once the envelope is at hand. Raises the typed refusals above."""
        model, edge_id = parse_update_subject(subject)
        envelope, path = await self.resolve(data)
        if self._on_wire is not None:
            self._on_wire(len(envelope), path)
        digest = sha256_hex(envelope)  # before verify: it decrypts a bytearray in place
        header, vector = await self.verify(envelope, model, edge_id, rounds.target(model))
        del envelope  # an object's buffer now holds the payload the vector views
        return OpenedUpdate(header, vector, digest)

    async def resolve(self, data: BytesLike) -> tuple[BytesLike, str]:
        """The envelope bytes of a message, read from the object source for a pointer,
        and which path it came by."""
        limit = self.max_update_bytes
        if not is_pointer(data):
            if len(data) > limit:
                raise Refused("oversize", f"message is {len(data)} bytes, over {limit}")
            return data, "inline"
        pointer = UpdatePointer.decode(data)
        if pointer.size > limit:
            raise Refused("oversize", f"pointer names {pointer.size} bytes, over {limit}")
        if pointer.bucket != self.object_bucket:
            raise Refused("bad-pointer", f"pointer names bucket {pointer.bucket!r}")
        envelope = await self._objects.read(pointer)
        pointer.check(envelope)
        return envelope, "object"

    async def verify(
        self,
        envelope: BytesLike,
        model: str,
        edge_id: str,
        target: RoundTarget | None,
        *,
        accepted_before: bool = False,
    ) -> tuple[UpdateHeader, Vector]:
        """Signature, decryption, header and payload checks, in a worker thread (CPU).

        ``accepted_before``: the update is in the ledger already (refold), so an edge
        revoked since then still has its key looked up."""
        registry = self._edges.current()
        return await asyncio.to_thread(
            self._verify, envelope, model, edge_id, registry, target, accepted_before
        )

    def _verify(
        self,
        envelope: BytesLike,
        model: str,
        edge_id: str,
        registry: EdgeRegistry,
        target: RoundTarget | None,
        accepted_before: bool,
    ) -> tuple[UpdateHeader, Vector]:
        claimed = read_header_unverified(envelope)
        if registry.status(claimed.edge_id) is EdgeStatus.REVOKED and not accepted_before:
            raise Refused("revoked-edge", f"edge {claimed.edge_id!r} is revoked")
        header, payload = open_update(
            envelope,
            recipient=self._recipient,
            edge_keys=registry.lookup_any if accepted_before else registry.lookup,
            max_payload=self.max_update_bytes,
            in_place=isinstance(envelope, bytearray),  # an object's buffer, ours alone
        )
        if (header.model, header.edge_id) != (model, edge_id):
            raise Refused(
                "subject-mismatch",
                f"signed for {header.model}/{header.edge_id}, published as {model}/{edge_id}",
            )
        if target is None:
            raise Refused("no-open-round", f"no round of {model!r} is open")
        target.check(header)
        return header, decode_update(payload, header.compression, target.sizes, take=True)


class StoreObjects:
    """The :class:`ObjectSource` over the NATS object store."""

    def __init__(self, js: JetStreamContext, timeout_s: float) -> None:
        self._js = js
        self._timeout_s = timeout_s

    async def read(self, pointer: UpdatePointer) -> bytearray:
        """The object's bytes, written into one buffer of the pointer's size as they come
        (no growing buffer, no copy at the end)."""
        store = await self._js.object_store(pointer.bucket)
        try:
            info = await store.get_info(pointer.name)
        except nats.js.errors.NotFoundError:
            raise Refused("object-missing", f"object {pointer.name} does not exist") from None
        if info.size != pointer.size:
            raise Refused(
                "bad-pointer", f"object is {info.size} bytes, pointer says {pointer.size}"
            )
        sink = _FixedSink(pointer.size)
        try:
            await asyncio.wait_for(
                store.get(pointer.name, writeinto=sink),  # type: ignore[arg-type]
                self._timeout_s,
            )
        except nats.js.errors.DigestMismatchError:
            raise Refused("bad-pointer", f"object {pointer.name} fails its digest") from None
        except nats.js.errors.NotFoundError:
            raise Refused("object-missing", f"object {pointer.name} does not exist") from None
        return sink.filled()


class _FixedSink:
    """A write target of exactly ``size`` bytes for the object store client; an object
    longer than its pointer says is refused rather than grown into."""

    def __init__(self, size: int) -> None:
        self._buffer = bytearray(size)
        self._at = 0

    def write(self, data: bytes) -> int:
        end = self._at + len(data)
        if end > len(self._buffer):
            raise Refused("bad-pointer", f"object is longer than the {len(self._buffer)} bytes")
        self._buffer[self._at : end] = data
        self._at = end
        return len(data)

    def filled(self) -> bytearray:
        if self._at != len(self._buffer):
            raise Refused("bad-pointer", f"object is {self._at} bytes, pointer says more")
        return self._buffer
