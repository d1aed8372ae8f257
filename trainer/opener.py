"""Opening a sealed update: resolve, verify, decrypt, decode. No acknowledgement here.

:class:`UpdateOpener` turns one message of the updates stream (its subject and bytes) into
an :class:`OpenedUpdate`, or refuses it with a typed exception:

1. the subject names the model and the edge (``TransportError`` ``bad-subject``);
2. a pointer message is resolved through an :class:`ObjectSource` (size limit first, then
   size and SHA-256 against the pointer; the pointer must name an object of the
   subject's model and edge): :class:`Refused` ``oversize``, ``bad-pointer``,
   ``object-missing``, ``object-unreadable`` (a link, bad metadata, missing chunks);
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
import base64
import binascii
import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo

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
from fedcore.errors import FedgateError, ReasonedError
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
    "object-unreadable",  # link, bad metadata, missing or too many chunks, stalled reads
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
        envelope, path, digest = await self.resolve(data, (model, edge_id))
        if self._on_wire is not None:
            self._on_wire(len(envelope), path)
        header, vector = await self.verify(envelope, model, edge_id, rounds.target(model))
        del envelope  # an object's buffer now holds the payload the vector views
        return OpenedUpdate(header, vector, digest)

    async def resolve(self, data: BytesLike, owner: tuple[str, str]) -> tuple[BytesLike, str, str]:
        """The envelope bytes of a message, read from the object source for a pointer,
        which path it came by, and their SHA-256 (hex; the ledger's digest: taken before
        :meth:`verify`, which decrypts a bytearray in place). ``owner`` is the (model,
        edge) of the message's subject: a pointer must name an object of that model and
        edge. The bytes are hashed once: an object's are the pointer's digest once
        :meth:`UpdatePointer.check` has compared them."""
        limit = self.max_update_bytes
        if not is_pointer(data):
            if len(data) > limit:
                raise Refused("oversize", f"message is {len(data)} bytes, over {limit}")
            return data, "inline", sha256_hex(data)
        pointer = UpdatePointer.decode(data)
        if pointer.size > limit:
            raise Refused("oversize", f"pointer names {pointer.size} bytes, over {limit}")
        if pointer.bucket != self.object_bucket:
            raise Refused("bad-pointer", f"pointer names bucket {pointer.bucket!r}")
        if tuple(pointer.name.split("/")[:2]) != owner:
            raise Refused("bad-pointer", f"pointer names {pointer.name}, not one of {owner}")
        envelope = await self._objects.read(pointer)
        pointer.check(envelope)
        return envelope, "object", pointer.sha256

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


class ObjectStalled(FedgateError):
    """An object's chunks did not all arrive within the read's time: perhaps the broker
    is slow, perhaps they never will. The consumer retries it a bounded number of times,
    then refuses it as ``object-unreadable``."""


MIN_CHUNK_BYTES = 1024
"""Fewest bytes a chunk but the last carries (edges write 4 KiB or more): an object of
``size`` bytes has at most ``size // MIN_CHUNK_BYTES + 1`` chunks, so a flood of empty
chunks is refused before it is read."""


class StoreObjects:
    """The :class:`ObjectSource` over the NATS object store.

    Every edge may write object metadata in the updates bucket, so the metadata is
    hostile input: it is read once (:meth:`info`), checked (no link, not deleted, the
    pointer's name and size, a digest, chunks that exist and are not too many), and the
    chunks of that one metadata's ``nuid`` are read by this class itself, into a buffer
    of the pointer's size, with the subscription always closed after. Unreadable objects
    are :class:`Refused` ``object-unreadable``; a read that runs out of time is
    :class:`ObjectStalled`.
    """

    def __init__(self, js: JetStreamContext, timeout_s: float) -> None:
        self._js = js
        self._timeout_s = timeout_s

    async def read(self, pointer: UpdatePointer) -> bytearray:
        """The object's bytes, written into one buffer of the pointer's size as they come
        (no growing buffer, no copy at the end)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                info = await self.info(pointer)
                if info.size == 0:
                    return bytearray()
                await self._check_chunks(pointer, info)
                return await self._read_chunks(pointer, info)
        except TimeoutError:
            raise ObjectStalled(
                f"object {pointer.name} not read within {self._timeout_s} s"
            ) from None

    async def info(self, pointer: UpdatePointer) -> ObjectInfo:
        """The object's metadata, checked against the pointer; read once, never again."""
        stream, name = _stream(pointer.bucket), pointer.name
        subject = f"$O.{pointer.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        try:
            raw = await self._js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            raise Refused("object-missing", f"object {name} does not exist") from None
        try:
            info: ObjectInfo = ObjectInfo.from_response(json.loads(raw.data or b""))
        except Exception:  # any shape an edge can write
            raise _unreadable(name, "its metadata is not object metadata") from None
        if info.deleted:
            raise Refused("object-missing", f"object {name} is deleted")
        if info.is_link():
            raise _unreadable(name, "it is a link")
        if info.name != name or info.bucket != pointer.bucket:
            raise _unreadable(name, f"its metadata names {info.bucket}/{info.name}")
        if not isinstance(info.nuid, str) or not _NUID.fullmatch(info.nuid):
            raise _unreadable(name, "its metadata has no valid nuid")
        if info.size != pointer.size:
            raise Refused(
                "bad-pointer", f"object is {info.size} bytes, pointer says {pointer.size}"
            )
        if _digest(info.digest) is None:
            raise _unreadable(name, "its metadata has no SHA-256 digest")
        return info

    async def _check_chunks(self, pointer: UpdatePointer, info: ObjectInfo) -> None:
        subject = _chunks_subject(pointer.bucket, info.nuid)
        state = (await self._js.stream_info(_stream(pointer.bucket), subject)).state
        count = (state.subjects or {}).get(subject, 0)
        if count == 0:
            raise _unreadable(pointer.name, "it has no chunks")
        if count != info.chunks or count > pointer.size // MIN_CHUNK_BYTES + 1:
            raise _unreadable(pointer.name, f"{count} chunks, its metadata says {info.chunks}")

    async def _read_chunks(self, pointer: UpdatePointer, info: ObjectInfo) -> bytearray:
        buffer, at, digest = bytearray(pointer.size), 0, hashlib.sha256()
        sub = await self._js.subscribe(
            _chunks_subject(pointer.bucket, info.nuid),
            stream=_stream(pointer.bucket),
            ordered_consumer=True,
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=None)  # the caller's deadline bounds it
                end = at + len(msg.data)
                if end > len(buffer):
                    raise Refused("bad-pointer", f"object is longer than {len(buffer)} bytes")
                buffer[at:end] = msg.data
                digest.update(msg.data)
                at = end
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if at != len(buffer):
            raise Refused("bad-pointer", f"object is {at} bytes, pointer says {len(buffer)}")
        if digest.digest() != _digest(info.digest):
            raise Refused("bad-pointer", f"object {pointer.name} fails its digest")
        return buffer


_NUID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def _chunks_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def _digest(value: object) -> bytes | None:
    """The 32 bytes of a ``SHA-256=<base64url>`` digest; None for anything else."""
    if not isinstance(value, str) or not value.upper().startswith("SHA-256="):
        return None
    try:
        raw = base64.urlsafe_b64decode(value[len("SHA-256=") :])
    except (ValueError, binascii.Error):
        return None
    return raw if len(raw) == 32 else None


def _unreadable(name: str, why: str) -> Refused:
    return Refused("object-unreadable", f"object {name} cannot be read: {why}")
