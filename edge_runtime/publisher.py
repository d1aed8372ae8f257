"""Publish sealed updates to the trainer over JetStream, at least once and deduplicated.

Every publish carries ``Nats-Msg-Id`` = the update id, so the stream keeps one copy of
an update re-published inside its duplicate window (a retry after a lost ack, say); the
trainer's ledger catches anything later. An envelope that does not fit the server's
``max_payload`` goes to the object store first (skipped when an object with the same
digest is already there, so retries are cheap) and a pointer message follows it. Each
JetStream ack is awaited with a bounded timeout and retried a bounded number of times
with the same message id; the caller learns the stream sequence or gets
``TransportError(publish-failed)``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nats.errors
import nats.js.errors
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions

from fedcore.envelope import BytesLike, RecipientPublicKey, read_header_unverified, suite_of
from fedcore.errors import TransportError
from fedcore.keys import load_ed25519, read_hpke_public
from fedcore.loops import Backoff
from fedcore.transport import (
    INLINE_MAX_BYTES,
    MSG_ID_HEADER,
    UPDATES_OBJECT_BUCKET,
    UPDATES_STREAM,
    UpdatePointer,
    fits_inline,
    update_object_name,
    update_subject,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Transient: no ack in time, the stream or bucket not there yet (the trainer creates
# them), the connection between servers. Anything else (a refused message) fails at once.
_RETRYABLE = (
    TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.BucketNotFoundError,
)
_MAX_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Published:
    """Where an update landed: stream sequence, whether the stream had it already,
    whether it went through the object store, and its envelope size."""

    seq: int
    duplicate: bool
    via_object: bool
    size: int


def load_edge_keys(
    identity_key_file: Path, trainer_hpke_public_key_file: Path
) -> tuple[ed25519.Ed25519PrivateKey, RecipientPublicKey]:
    """This edge's signing identity and the trainer's HPKE public key, from their files;
    updates are sealed with the suite the public file names (X25519 or ML-KEM-768+X25519)."""
    signer = load_ed25519(identity_key_file)
    recipient = read_hpke_public(trainer_hpke_public_key_file)
    log.info("updates are sealed with HPKE suite %s", suite_of(recipient))
    return signer, recipient


class UpdatePublisher:
    """Publishes envelopes; ``max_payload`` is the server's (see :meth:`for_connection`)."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_payload: int,
        ack_timeout_s: float = 5.0,
        attempts: int = 4,
        backoff_s: float = 0.5,
        stream: str = UPDATES_STREAM,
        object_bucket: str = UPDATES_OBJECT_BUCKET,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1 or ack_timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need attempts >= 1, ack_timeout_s > 0, backoff_s >= 0")
        self._js = js
        self.max_payload = max_payload
        self.ack_timeout_s = ack_timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.stream = stream
        self.object_bucket = object_bucket
        self._rand = rand

    @classmethod
    def for_connection(
        cls, nc: NATS, *, ack_timeout_s: float = 5.0, attempts: int = 4, backoff_s: float = 0.5
    ) -> UpdatePublisher:
        """A publisher on ``nc``: inline up to the updates stream's message limit (the
        server's ``max_payload``, at most :data:`INLINE_MAX_BYTES`)."""
        return cls(
            nc.jetstream(),
            max_payload=min(nc.max_payload, INLINE_MAX_BYTES),
            ack_timeout_s=ack_timeout_s,
            attempts=attempts,
            backoff_s=backoff_s,
        )

    async def publish(self, envelope: BytesLike, *, msg_id: str | None = None) -> Published:
        """Publish one sealed envelope; ``msg_id`` defaults to its update id.

        The subject comes from the envelope's (unverified) header: the trainer checks
        that it matches the signed one.
        """
        header = read_header_unverified(envelope)
        data = memoryview(envelope).cast("B")  # no copy of a large envelope
        subject = update_subject(header.model, header.edge_id)
        msg_id = msg_id or header.update_id
        via_object = not fits_inline(len(data), self.max_payload)
        body = bytes(data) if not via_object else b""
        if via_object:
            name = update_object_name(header.model, header.edge_id, header.update_id)
            pointer = await self._retry(
                "object put", lambda: self._put_object(name, data), header.update_id
            )
            body = pointer.encode()
        ack = await self._retry(
            "publish",
            lambda: self._js.publish(
                subject,
                body,
                timeout=self.ack_timeout_s,
                stream=self.stream,
                headers={MSG_ID_HEADER: msg_id},
            ),
            header.update_id,
        )
        log.info(
            "update published",
            extra={
                "update_id": header.update_id,
                "model": header.model,
                "round": header.round,
                "seq": ack.seq,
                "duplicate": bool(ack.duplicate),
                "via_object": via_object,
                "bytes": len(data),
            },
        )
        return Published(ack.seq, bool(ack.duplicate), via_object, len(data))

    async def _put_object(self, name: str, data: memoryview) -> UpdatePointer:
        store = await self._js.object_store(self.object_bucket)
        pointer = UpdatePointer.for_envelope(data, self.object_bucket, name)
        digest = "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(pointer.sha256)).decode()
        try:
            info = await store.get_info(name)
            if info.size == len(data) and info.digest == digest and not info.deleted:
                return pointer
        except nats.js.errors.ObjectNotFoundError:
            pass
        chunk = max(4096, min(_MAX_CHUNK, self.max_payload // 2))
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        reader = _ViewReader(data)  # the client reads chunks from it: no copy of the whole
        await asyncio.wait_for(
            store.put(name, reader, meta=meta),  # type: ignore[arg-type]
            self._object_timeout(len(data)),
        )
        return pointer

    def _object_timeout(self, size: int) -> float:
        return self.ack_timeout_s * (1 + size // (8 * 1024 * 1024))

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]], update_id: str) -> T:
        failure: BaseException | None = None
        # doubling delays with jitter: after a broker outage a fleet's edges do not all
        # retry in the same instant
        delays = (
            Backoff(self.backoff_s, 64 * self.backoff_s, jitter=0.5, rand=self._rand)
            if self.backoff_s > 0
            else None
        )
        for attempt in range(1, self.attempts + 1):
            try:
                return await call()
            except (TimeoutError, nats.errors.Error) as exc:
                if not isinstance(exc, _RETRYABLE):
                    raise TransportError(
                        "publish-failed", f"{what} of update {update_id} refused: {exc!r}"
                    ) from None
                failure = exc
            if attempt < self.attempts:
                log.warning(
                    "update %s failed, retrying",
                    what,
                    extra={"update_id": update_id, "attempt": attempt, "error": repr(failure)},
                )
                await asyncio.sleep(delays.next() if delays is not None else 0.0)
        raise TransportError(
            "publish-failed",
            f"{what} of update {update_id} failed {self.attempts} times: {failure!r}",
        )


class _ViewReader:
    """A ``readinto`` source over a memoryview for the object store client."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._at = 0

    def readinto(self, buffer: bytearray) -> int:
        n = min(len(buffer), len(self._data) - self._at)
        buffer[:n] = self._data[self._at : self._at + n]
        self._at += n
        return n
