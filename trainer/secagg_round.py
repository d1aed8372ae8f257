"""Secure rounds on the trainer: drive :class:`fedcore.secagg.SecAggServer` over core NATS.

When a sync round of a model with secure aggregation opens, :class:`SecAggCoordinator`
runs one :class:`SecAggRound` for it. Each step sends its request to the edges that are
still in (``fedgate.secagg.<model>.to.<edge>``), sends it again every ``resend_s`` to
those that have not answered (core NATS is at most once; edges answer a repeated request
with their first answer) and closes when everyone answered or at its deadline:

1. setup -> key adverts, 2. advert bundles -> shares, 3. share deliveries -> masked
inputs (until the round's deadline: edges send theirs when fine-tuning is done),
4. survivor list -> signatures, 5. unmask requests -> unmask responses, then
``finish()``. Every step but the masked input has ``phase_timeout_s``.

Answers come on ``fedgate.secagg.<model>.from.<edge>``: NATS permissions let only that
edge publish there, and a message naming another edge is refused. A refused answer is
logged with its reason (a repeated one, ``duplicate``, silently) and the round goes on
without that edge; too few edges left fails the round with the protocol's reason. A round
that fails, or a trainer that restarts mid-round, releases nothing: the round is recorded
as failed and the next one opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.msg import Msg
from numpy.typing import NDArray

from fedcore import subjects
from fedcore.errors import ConfigError, FedgateError, SecAggError
from fedcore.secagg import (
    AggregateResult,
    KeyAdvert,
    MaskedInput,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    SurvivorSignature,
    UnmaskResponse,
)
from fedcore.secagg.config import MIN_PARTICIPANTS, RoundParams
from fedcore.secagg.frame import (
    ANSWERS,
    FROM_EDGE,
    Frame,
    Phase,
    masked_frame_bytes,
)
from fedcore.secagg.parts import ACK, BUSY, Reassembler
from fedcore.secagg.quantize import edge_bound
from fedcore.wire import round_id
from trainer.rounds import RoundBook, SecAggOutcome
from trainer.secagg_metrics import SecAggMetrics

log = logging.getLogger(__name__)

Send = Callable[[str, bytes], Awaitable[None]]
Alive = Callable[[], Collection[str]]
Accept = Callable[[str, bytes], None]
M = TypeVar("M", KeyAdvert, ShareBundle, MaskedInput, SurvivorSignature, UnmaskResponse)
Until = Literal["round", "bounded", "own"]


class EnrolledKeys(Protocol):
    """The edge registry as the coordinator needs it (``trainer.registry.RegistryFile``)."""

    def active_keys(self) -> dict[str, ed25519.Ed25519PublicKey]: ...


@dataclass(frozen=True)
class SecAggTiming:
    """Deadlines of a secure round's steps, and how often a request is sent again."""

    phase_timeout_s: float = 10.0
    resend_s: float = 1.0


@dataclass(frozen=True)
class SecAggResult:
    """How a secure round ended: the aggregate, or why it failed."""

    aggregate: AggregateResult | None
    failure: str | None
    sensitivity: float = 0.0
    reason: str | None = None  # the protocol's reason for a failure (``out-of-range``, ...)


def sensitivity(params: RoundParams, dim: int) -> float:
    """L2 bound on one edge's part of the dequantised sum: its clip plus the rounding
    error, below one quantisation step per coordinate (``step * sqrt(dim)``)."""
    return edge_bound(params, dim)


def _accept(cls: type[M], receive: Callable[[M], None]) -> Accept:
    def accept(edge: str, body: bytes) -> None:
        msg = cls.from_bytes(body)
        if msg.edge != edge:
            raise SecAggError("unexpected-sender", f"names {msg.edge!r}, came from {edge}", edge)
        receive(msg)

    return accept


class SecAggRound:
    """One secure round of one model over the ``enrolled`` cohort (edge -> Ed25519 key);
    fewer than ``quorum`` masked inputs fail it before anything is unmasked."""

    def __init__(
        self,
        send: Send,
        *,
        model: str,
        round_no: int,
        config: SecAggConfig,
        enrolled: Mapping[str, ed25519.Ed25519PublicKey],
        dim: int,
        deadline_ts: float,
        timing: SecAggTiming,
        quorum: int = 1,
        alive: Alive | None = None,
    ) -> None:
        self._send = send
        self.quorum = quorum
        self.alive = alive
        self.model = model
        self.round_no = round_no
        self.config = config
        self.enrolled = dict(enrolled)
        self.dim = dim
        self.deadline_ts = deadline_ts
        self.timing = timing
        # at most one answer per edge waits here (``offer``), so no bound is needed
        self.inbox: asyncio.Queue[tuple[str, Frame]] = asyncio.Queue()
        self._awaiting: Phase | None = None  # the answer the running step waits for
        self._pending: set[str] = set()  # edges that have not given it
        self._queued: set[str] = set()  # edges with an answer in the inbox
        self.dropped_frames = 0

    def offer(self, edge: str, frame: Frame) -> None:
        """Queue an edge's answer for the running step: only the answer the step waits
        for, from an edge that owes it, one at a time (a flooding edge cannot crowd out the
        others); anything else is dropped and counted."""
        if (
            frame.round != self.round_no
            or frame.phase is not self._awaiting
            or edge not in self._pending
            or edge in self._queued
        ):
            self.dropped_frames += 1
            return
        self._queued.add(edge)
        self.inbox.put_nowait((edge, frame))

    async def run(self) -> SecAggResult:
        """Run the protocol; a failure is returned, never raised."""
        params: RoundParams | None = None
        server: SecAggServer | None = None
        try:
            server = SecAggServer(
                self.config,
                round_id(self.model, self.round_no),
                self.enrolled,
                self.dim,
            )
            params = server.params
            aggregate = await self._steps(server)
        except SecAggError as exc:
            return self._failed(exc, exc.reason)
        except ConfigError as exc:
            return self._failed(exc, "config")
        finally:
            if server is not None:
                self._name_culprits(server.culprits)
            await self._broadcast(Phase.END, b"", self.enrolled)
        return SecAggResult(aggregate, None, sensitivity(params, self.dim))

    def _failed(self, exc: FedgateError, reason: str) -> SecAggResult:
        log.warning(
            "secure round failed: %s", exc, extra={"model": self.model, "round": self.round_no}
        )
        return SecAggResult(None, f"secure aggregation failed: {exc}", reason=reason)

    async def _steps(self, server: SecAggServer) -> AggregateResult:
        cohort = sorted(self.enrolled)
        setup = server.setup.to_bytes()
        await self._exchange(
            {e: setup for e in cohort},
            Phase.SETUP,
            _accept(KeyAdvert, server.receive_advert),
            "bounded",
        )
        bundles = server.close_adverts()
        await self._exchange(
            {e: b.to_bytes() for e, b in bundles.items()},
            Phase.ADVERT_BUNDLE,
            _accept(ShareBundle, server.receive_shares),
            "bounded",
        )
        deliveries = server.close_shares()
        self._progress("keys shared", len(deliveries))
        await self._exchange(
            {e: d.to_bytes() for e, d in deliveries.items()},
            Phase.DELIVERY,
            _accept(MaskedInput, server.receive_masked_input),
            "round",
        )
        survivors = server.close_masked_inputs()
        self._progress("masked inputs in", len(survivors.survivors))
        if len(survivors.survivors) < self.quorum:  # before anything is unmasked
            raise SecAggError(
                "below-threshold",
                f"{len(survivors.survivors)} masked inputs, MIN_UPDATES is {self.quorum}",
            )
        listed = survivors.to_bytes()
        await self._exchange(
            {e: listed for e in survivors.survivors},
            Phase.SURVIVORS,
            _accept(SurvivorSignature, server.receive_survivor_signature),
            "own",
        )
        requests = server.close_signatures()
        await self._exchange(
            {e: r.to_bytes() for e, r in requests.items()},
            Phase.UNMASK_REQUEST,
            _accept(UnmaskResponse, server.receive_unmask),
            "own",
        )
        result = await asyncio.to_thread(server.finish)
        self._progress("unmasked", len(result.survivors), dropped=len(result.dropped))
        return result

    def _name_culprits(self, culprits: Mapping[str, str]) -> None:
        for edge, why in sorted(culprits.items()):
            log.warning(
                "secure round: edge caught misbehaving: %s",
                why,
                extra={"model": self.model, "round": self.round_no, "edge": edge},
            )

    def _progress(self, what: str, edges: int, **extra: Any) -> None:
        log.info(
            "secure round: %s",
            what,
            extra={"model": self.model, "round": self.round_no, "edges": edges, **extra},
        )

    def _deadline(self, until: Until) -> float:
        """The step's deadline on the loop's clock: the round's (masked inputs), the
        step's own timeout but not past the round's (key exchange), or its own."""
        loop = asyncio.get_running_loop()
        to_round = self.deadline_ts - time.time()
        if until == "round":
            return loop.time() + to_round
        if until == "bounded":
            return loop.time() + min(self.timing.phase_timeout_s, max(to_round, 0.0))
        return loop.time() + self.timing.phase_timeout_s

    async def _exchange(
        self,
        requests: Mapping[str, bytes],
        ask: Phase,
        accept: Accept,
        until: Until,
    ) -> None:
        """Send ``requests`` (again every ``resend_s``) until every edge answered, or was
        refused, or the step's deadline passed. While waiting for masked inputs (until the
        round's deadline), an edge whose heartbeats stopped (``alive``) is given up: it is a
        dropout now rather than at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = self._deadline(until)
        answer = ANSWERS[ask]
        pending = set(requests)
        self._awaiting, self._pending, self._queued = answer, pending, set()
        resend_at = 0.0
        while pending and loop.time() < deadline:
            if loop.time() >= resend_at:
                if until == "round" and self.alive is not None:
                    self._give_up_silent(pending, set(self.alive()))
                for edge in sorted(pending):
                    await self._send_one(edge, ask, requests[edge])
                resend_at = loop.time() + self.timing.resend_s
            wait = max(0.0, min(resend_at, deadline) - loop.time())
            try:
                edge, frame = await asyncio.wait_for(self.inbox.get(), wait)
            except TimeoutError:
                continue
            self._queued.discard(edge)
            if frame.phase is not answer or edge not in pending:
                continue  # a late or repeated answer to an earlier step
            try:
                accept(edge, frame.body)
            except SecAggError as exc:
                if exc.reason != "duplicate":
                    log.warning(
                        "secure round: answer refused: %s",
                        exc,
                        extra={"model": self.model, "round": self.round_no, "edge": edge},
                    )
            pending.discard(edge)

    def _give_up_silent(self, pending: set[str], alive: set[str]) -> None:
        if not alive:  # nobody heard from: the trainer is cut off (NATS down), not the edges
            return
        for edge in sorted(pending - alive):
            log.warning(
                "secure round: no heartbeat, counted as dropped",
                extra={"model": self.model, "round": self.round_no, "edge": edge},
            )
            pending.discard(edge)

    async def _send_one(self, edge: str, phase: Phase, body: bytes) -> None:
        frame = Frame(phase, self.round_no, body).encode()
        await self._send(subjects.secagg_to_edge(self.model, edge), frame)

    async def _broadcast(self, phase: Phase, body: bytes, edges: Mapping[str, object]) -> None:
        for edge in sorted(edges):
            with contextlib.suppress(Exception):  # best effort, edge by edge
                await self._send_one(edge, phase, body)


@dataclass
class _Running:
    round: SecAggRound
    task: asyncio.Task[SecAggResult]


class SecAggCoordinator:
    """The secure rounds of every model with secure aggregation on, one at a time each."""

    def __init__(
        self,
        send: Send,
        registry: EnrolledKeys,
        configs: Mapping[str, SecAggConfig],
        dims: Mapping[str, int],
        timing: SecAggTiming,
        alive: Alive | None = None,
        metrics: SecAggMetrics | None = None,
    ) -> None:
        self._send = send
        self._alive = alive
        self._metrics = metrics
        self._registry = registry
        self.configs = dict(configs)
        self.dims = dict(dims)
        self.timing = timing
        self._running: dict[str, _Running] = {}
        self._parts = Reassembler(max_open=2, stale_s=max(timing.resend_s * 4, 5.0))
        """Masked inputs too large for one message come in parts (at most two at once)."""

    def handles(self, model: str) -> bool:
        """True when ``model``'s rounds are securely aggregated."""
        return model in self.configs

    def cohort(self, alive: list[str], minimum: int) -> list[str] | None:
        """The enrolled edges among ``alive``, or None when fewer than ``minimum`` (at
        least the protocol's minimum) are."""
        keys = self._registry.active_keys()
        edges = sorted(e for e in alive if e in keys)
        return edges if len(edges) >= max(minimum, MIN_PARTICIPANTS) else None

    async def on_message(self, msg: Msg) -> None:
        """An edge's answer (subscription callback on ``fedgate.secagg.*.from.*``)."""
        parsed = subjects.parse_secagg_subject(msg.subject)
        if parsed is None:
            return
        model, direction, edge = parsed
        running = self._running.get(model)
        if direction != "from" or running is None:
            return
        dropped = self._parts.dropped
        try:
            whole = self._parts.offer(
                f"{model}/{edge}",
                msg.data,
                max_total=masked_frame_bytes(self.dims[model]),
                now=time.monotonic(),
            )
            if msg.reply:  # a paced part: the edge waits for this before sending more
                await msg.respond(BUSY if self._parts.dropped > dropped else ACK)
            if whole is None:  # more parts to come
                return
            frame = Frame.decode(bytes(whole))
        except SecAggError as exc:
            log.warning("secure round: bad frame: %s", exc, extra={"model": model, "edge": edge})
            if msg.reply:
                await msg.respond(exc.reason.encode())
            return
        if frame.phase in FROM_EDGE:
            running.round.offer(edge, frame)

    def begin(self, book: RoundBook) -> None:
        """Start the protocol for ``book``'s open (secure) round over its invited edges."""
        rnd = book.current
        if rnd is None or not rnd.announcement.secure:
            raise ValueError(f"{book.model}: no open secure round")
        a = rnd.announcement
        keys = self._registry.active_keys()
        enrolled = {e: keys[e] for e in a.sampled or [] if e in keys}
        secagg = SecAggRound(
            self._send,
            model=book.model,
            round_no=a.round,
            config=self.configs[book.model],
            enrolled=enrolled,
            dim=self.dims[book.model],
            deadline_ts=a.deadline_ts,
            timing=self.timing,
            quorum=a.min_updates,
            alive=self._alive,
        )
        self._running[book.model] = _Running(secagg, asyncio.create_task(secagg.run()))

    def outcome(self, model: str) -> SecAggResult | None:
        """The finished round's result (forgetting it), or None while it runs."""
        running = self._running.get(model)
        if running is None:
            return SecAggResult(None, "no secure round ran (the trainer restarted?)")
        if not running.task.done():
            return None
        del self._running[model]
        if running.task.cancelled():
            return SecAggResult(None, "secure round cancelled")
        error = running.task.exception()
        if error is not None:
            log.error("secure round crashed", exc_info=error, extra={"model": model})
            result = SecAggResult(None, f"secure aggregation failed: {error!r}", reason="crash")
        else:
            result = running.task.result()
        if self._metrics is not None:
            culprits = 0 if result.aggregate is None else len(result.aggregate.culprits)
            self._metrics.observe(model, result.reason, culprits)
        return result

    async def stop(self) -> None:
        """Cancel running rounds (shutdown)."""
        for running in self._running.values():
            running.task.cancel()
        for running in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running.task
        self._running.clear()


def fold_result(book: RoundBook, result: SecAggResult) -> str | None:
    """Fold a finished secure round's aggregate into ``book``; the failure reason, if any."""
    if result.aggregate is None:
        return result.failure or "secure aggregation failed"
    agg = result.aggregate
    total: NDArray[np.float64] = agg.float_sum
    book.fold_secagg(total, SecAggOutcome(agg.survivors, agg.dropped), result.sensitivity)
    return None
