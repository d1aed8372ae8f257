"""Consume sealed updates from JetStream: fetch, open, record, fold, acknowledge.

For each message of the trainer's durable pull consumer:

1. :class:`trainer.opener.UpdateOpener` opens it (resolve a pointer, verify the edge's
   signature, decrypt, check the header against the round open now, decode), or refuses
   it with a typed exception;
2. the ledger records (model, round, edge); if a record is there already, the message is
   a duplicate (same update id) or a second update of that edge: acked, not folded
   (a record this trainer wrote although the reply was lost is its own: folded);
3. the aggregator folds it; only then is the message acknowledged.

A refused update is logged with its reason, counted, and terminated (``+TERM``) so it is
not redelivered. A transient failure (NATS, the object store) leaves the message for
redelivery with a delay; an object read that stalls is retried ``object_attempts``
deliveries, then refused (``object-unreadable``). Nothing a bad input does stops the loop.
After a restart, :meth:`UpdateIngestor.refold` folds again what the ledger accepted after
the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from fedcore.compression import Vector
from fedcore.envelope import RecipientPrivateKey, UpdateHeader
from fedcore.errors import EnvelopeError, FedgateError, ReasonedError
from fedcore.transport import (
    TRAINER_CONSUMER,
    UPDATES_OBJECT_BUCKET,
    UPDATES_STREAM,
    parse_update_subject,
)
from trainer.bus import updates_consumer_config
from trainer.errors import TrainerError
from trainer.ingest_metrics import IngestMetrics
from trainer.ledger import Claim, LedgerRecord, UpdateLedger
from trainer.opener import (
    EdgeDirectory,
    ObjectStalled,
    Refused,
    RoundSource,
    RoundTarget,
    StoreObjects,
    UpdateOpener,
)
from trainer.settings import trainer_default

log = logging.getLogger(__name__)

_TRANSIENT = (TimeoutError, nats.errors.Error)


@dataclass(frozen=True)
class AcceptedUpdate:
    """A verified, decoded update, recorded in the ledger, ready to fold."""

    header: UpdateHeader
    vector: Vector
    digest: str
    stream_seq: int


class Aggregator(Protocol):
    """Folds accepted updates into the running round state.

    ``fold`` may refuse by raising a :class:`trainer.errors.TrainerError`, whose reason
    becomes the rejection's; the round state must then be unchanged (the ledger record is
    released again). Folding an update id the open round holds already must change
    nothing: an update whose ledger claim was in doubt (its reply lost) is folded when it
    comes again.
    """

    def fold(self, update: AcceptedUpdate) -> None: ...


class Disposition(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    RETRY = "retry"


@dataclass(frozen=True)
class Outcome:
    """What became of one message; ``reason`` is set for rejections and retries."""

    disposition: Disposition
    reason: str | None = None
    update_id: str | None = None


@dataclass(frozen=True)
class IngestOptions:
    """Limits and timings of the ingestor."""

    max_update_bytes: int = trainer_default("max_update_bytes")
    batch: int = 16
    fetch_timeout_s: float = 1.0
    ack_timeout_s: float = 5.0
    object_timeout_s: float = 60.0
    object_attempts: int = 3  # deliveries of a pointer whose object read stalls
    retry_delay_s: float = 2.0
    ack_wait_s: float = trainer_default("updates_ack_wait_s")
    durable: str = TRAINER_CONSUMER
    stream: str = UPDATES_STREAM
    object_bucket: str = UPDATES_OBJECT_BUCKET
    model: str | None = None  # consume one model's updates only


class RecoveryError(FedgateError):
    """An accepted update cannot be folded again from the stream (see :meth:`refold`)."""


class UpdateIngestor:
    """The trainer's consumer of updates. ``bind`` then ``run`` (or ``poll``)."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        recipient: RecipientPrivateKey,
        edges: EdgeDirectory,
        rounds: RoundSource,
        aggregator: Aggregator,
        ledger: UpdateLedger,
        metrics: IngestMetrics,
        options: IngestOptions | None = None,
    ) -> None:
        self._js = js
        self._rounds = rounds
        self._aggregator = aggregator
        self._ledger = ledger
        self.metrics = metrics
        self.options = o = options or IngestOptions()
        self.opener = UpdateOpener(
            recipient=recipient,
            edges=edges,
            objects=StoreObjects(js, o.object_timeout_s),
            max_update_bytes=o.max_update_bytes,
            object_bucket=o.object_bucket,
            on_wire=self._observe_wire,
        )
        self._sub: JetStreamContext.PullSubscription | None = None
        self._unsure: set[str] = set()
        """Update ids whose ledger claim failed in transit: the claim may have been written
        (the server wrote it, the reply was lost) without the update being folded."""

    def consumer_config(self) -> ConsumerConfig:
        o = self.options
        return updates_consumer_config(durable=o.durable, model=o.model, ack_wait_s=o.ack_wait_s)

    async def bind(self) -> None:
        """Create (or update) the durable consumer and bind a pull subscription to it."""
        await self._js.add_consumer(self.options.stream, config=self.consumer_config())
        self._sub = await self._js.pull_subscribe_bind(
            durable=self.options.durable, stream=self.options.stream
        )

    async def fetch(self, batch: int | None = None, timeout_s: float | None = None) -> list[Msg]:
        """Messages from the consumer (none when the fetch times out)."""
        if self._sub is None:
            raise RuntimeError("bind() the ingestor first")
        o = self.options
        try:
            return await self._sub.fetch(batch or o.batch, timeout=timeout_s or o.fetch_timeout_s)
        except TimeoutError:  # nats.errors.TimeoutError or asyncio's, depending on the path
            return []

    async def poll(self, batch: int | None = None, timeout_s: float | None = None) -> list[Outcome]:
        """Fetch one batch and handle every message of it."""
        return [await self.handle(msg) for msg in await self.fetch(batch, timeout_s)]

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; connection trouble is logged and waited out."""
        while not stop.is_set():
            try:
                await self.poll()
            except _TRANSIENT as exc:
                log.warning("update fetch failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(self.options.retry_delay_s)

    async def catch_up(self, within_s: float = 30.0, timeout_s: float = 0.5) -> int:
        """Handle what the stream holds now, until a fetch finds nothing (at most
        ``within_s``); how many. After a restart, before rounds are judged: a deadline
        that passed while the trainer was down must not drop the updates sent in time."""
        loop = asyncio.get_running_loop()
        deadline, handled = loop.time() + within_s, 0
        while loop.time() < deadline:
            try:
                outcomes = await self.poll(timeout_s=timeout_s)
            except _TRANSIENT as exc:
                log.warning("catching up failed; rounds go on", extra={"error": repr(exc)})
                break
            if not outcomes:
                break
            handled += len(outcomes)
        return handled

    async def backlog(self) -> int:
        """Messages of the consumer not answered yet: undelivered, or delivered and not acked
        (a killed trainer's stay so until the ack wait redelivers them)."""
        info = await self._js.consumer_info(self.options.stream, self.options.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def handle(self, msg: Msg) -> Outcome:
        """Process one message and acknowledge it: ack, term or nak."""
        outcome = await self.process(msg)
        await self.acknowledge(msg, outcome)
        return outcome

    async def process(self, msg: Msg) -> Outcome:
        """Everything but the acknowledgement (split out so a crash before it can be
        simulated); counts and logs the outcome."""
        meta = msg.metadata
        seq, delivered = meta.sequence.stream, meta.num_delivered
        context = {"subject": msg.subject, "seq": seq, "delivered": delivered}
        try:
            header = await self._accept(msg.subject, msg.data, seq)
        except ReasonedError as exc:  # Refused, EnvelopeError, TransportError
            return self._rejected(exc.reason, exc.detail, context)
        except (ObjectStalled, *_TRANSIENT) as exc:
            return self._unsettled(exc, delivered, context)
        except Exception as exc:  # a bug must not stop the trainer or lose the update
            log.exception("update handling failed unexpectedly", extra=context)
            return self._retry(f"internal error: {exc!r}", context)
        if isinstance(header, Outcome):
            return header
        self.metrics.accepted.inc()
        log.info(
            "update accepted",
            extra={
                **context,
                "edge": header.edge_id,
                "model": header.model,
                "round": header.round,
                "update_id": header.update_id,
                "num_samples": header.num_samples,
            },
        )
        return Outcome(Disposition.ACCEPTED, update_id=header.update_id)

    async def acknowledge(self, msg: Msg, outcome: Outcome) -> None:
        """Acknowledge as the outcome says; a failed ack only means a later duplicate."""
        try:
            if outcome.disposition is Disposition.ACCEPTED:
                await msg.ack_sync(timeout=self.options.ack_timeout_s)
            elif outcome.disposition is Disposition.DUPLICATE:
                await msg.ack()
            elif outcome.disposition is Disposition.REJECTED:
                await msg.term()
            else:
                await msg.nak(delay=self.options.retry_delay_s)
        except _TRANSIENT as exc:
            log.warning(
                "acknowledgement failed; the message will come again",
                extra={"disposition": outcome.disposition.value, "error": repr(exc)},
            )

    # -- the pipeline ------------------------------------------------------------------
    async def _accept(self, subject: str, data: bytes, seq: int) -> UpdateHeader | Outcome:
        opened = await self.opener.open(subject, data, self._rounds)
        update = AcceptedUpdate(opened.header, opened.vector, opened.digest, seq)
        return await self._record_and_fold(update)

    async def _record_and_fold(self, update: AcceptedUpdate) -> UpdateHeader | Outcome:
        h = update.header
        record = LedgerRecord.now(h.update_id, update.digest, update.stream_seq, h.num_samples)
        claim = await self._claim(h, record)
        if not claim.first:
            if claim.record.update_id == h.update_id:
                log.info(
                    "update already counted",
                    extra={"reason": "duplicate", "update_id": h.update_id, "edge": h.edge_id},
                )
                self.metrics.rejected.labels(reason="duplicate").inc()
                return Outcome(Disposition.DUPLICATE, "duplicate", h.update_id)
            raise Refused(
                "second-update",
                f"edge {h.edge_id!r} already contributed {claim.record.update_id} "
                f"to round {h.round}",
            )
        try:
            self._aggregator.fold(update)
        except TrainerError as exc:
            await self._release(h, claim.revision)
            raise Refused(exc.reason, f"aggregator refused the update: {exc}") from None
        except Exception as exc:
            await self._release(h, claim.revision)
            log.exception("fold failed", extra={"update_id": h.update_id})
            raise Refused("fold-failed", f"aggregator refused the update: {exc}") from None
        return h

    async def _claim(self, h: UpdateHeader, record: LedgerRecord) -> Claim:
        """The ledger claim of ``h``. A claim whose reply was lost (a NATS restart, say)
        may have been written: when the update comes again and finds its own record from
        that attempt, the claim is ours and the update still has to be folded."""
        try:
            claim = await self._ledger.record(h.model, h.round, h.edge_id, record)
        except _TRANSIENT:
            self._unsure.add(h.update_id)
            raise
        if h.update_id in self._unsure:
            self._unsure.discard(h.update_id)
            mine = claim.record.update_id == h.update_id and claim.record.digest == record.digest
            if not claim.first and mine:
                log.info(
                    "ledger claim written before its reply was lost",
                    extra={"update_id": h.update_id},
                )
                return Claim(True, claim.record, claim.revision)
        return claim

    async def _release(self, h: UpdateHeader, revision: int) -> None:
        try:
            await self._ledger.release(h.model, h.round, h.edge_id, revision)
        except _TRANSIENT as exc:
            log.error(
                "ledger claim of an unfolded update not released; recover() will refold it",
                extra={"update_id": h.update_id, "error": repr(exc)},
            )

    def _observe_wire(self, size: int, path: str) -> None:
        self.metrics.wire_bytes.labels(path=path).observe(size)

    def _rejected(self, reason: str, detail: str, context: dict[str, object]) -> Outcome:
        self.metrics.rejected.labels(reason=reason).inc()
        log.warning("update rejected", extra={**context, "reason": reason, "detail": detail})
        return Outcome(Disposition.REJECTED, reason)

    def _unsettled(self, exc: Exception, delivered: int, context: dict[str, object]) -> Outcome:
        """A transient failure is retried; an object read that stalled only
        ``object_attempts`` times, then it is refused: a pointer to an object that cannot
        be read must not hold up the (one at a time) ingest for ever."""
        if isinstance(exc, ObjectStalled) and delivered >= self.options.object_attempts:
            return self._rejected("object-unreadable", f"{exc} ({delivered} tries)", context)
        return self._retry(repr(exc), context)

    def _retry(self, detail: str, context: dict[str, object]) -> Outcome:
        self.metrics.retried.inc()
        log.warning("update left for redelivery", extra={**context, "detail": detail})
        return Outcome(Disposition.RETRY, "transient")

    # -- recovery ----------------------------------------------------------------------
    async def refold(self, target: RoundTarget, folded: Collection[str]) -> list[str]:
        """Fold again every update the ledger accepted for ``target``'s round whose id is
        not in ``folded`` (the ids a restored round checkpoint already holds).

        Each is read back from the stream by the sequence its ledger record names and
        checked against that record (digest, update id, edge) before folding. Returns
        the refolded update ids. Raises :class:`RecoveryError` if one cannot be read.
        """
        records = await self._ledger.accepted(target.model, target.round)
        done: list[str] = []
        for edge_id, record in sorted(records.items()):
            if record.update_id in folded:
                continue
            update = await self._reload(target, edge_id, record)
            self._aggregator.fold(update)
            done.append(record.update_id)
            log.info("accepted update folded again", extra={"update_id": record.update_id})
        return done

    async def _reload(
        self, target: RoundTarget, edge_id: str, record: LedgerRecord
    ) -> AcceptedUpdate:
        try:
            raw = await self._js.get_msg(self.options.stream, record.stream_seq)
            subject, data = raw.subject or "", raw.data or b""
            model, subject_edge = parse_update_subject(subject)
            envelope, _, digest = await self.opener.resolve(data, (model, subject_edge))
        except (FedgateError, *_TRANSIENT) as exc:  # ObjectStalled is a FedgateError
            raise RecoveryError(
                f"update {record.update_id} (seq {record.stream_seq}) cannot be read: {exc!r}"
            ) from None
        if digest != record.digest or subject_edge != edge_id:
            raise RecoveryError(
                f"stream message {record.stream_seq} is not update {record.update_id}"
            )
        try:
            header, vector = await self.opener.verify(
                envelope, model, subject_edge, target, accepted_before=True
            )
        except (Refused, EnvelopeError) as exc:
            raise RecoveryError(f"update {record.update_id} no longer verifies: {exc}") from None
        if header.update_id != record.update_id:
            raise RecoveryError(
                f"stream message {record.stream_seq} is not update {record.update_id}"
            )
        return AcceptedUpdate(header, vector, record.digest, record.stream_seq)
