"""Secure rounds on the edge: answer the trainer's secure-aggregation steps over core NATS.

For each model with secure aggregation on (``FEDGATE_EDGE_SECAGG``), the edge listens on
``fedgate.secagg.<model>.to.<edge>`` and answers on ``...from.<edge>`` (NATS permissions
give it those two subjects and no other edge's). A round goes:

- ``setup``: only for the round the trainer announced as secure and that invites this edge,
  with the settings this edge has; a fresh :class:`SecAggClient` advertises its keys
  (peers' keys come from the edge registry file, not from the trainer);
- ``advert bundle`` -> shares; ``delivery`` -> kept until the learner hands over its
  update (:meth:`SecAggParticipant.submit`), then the masked input goes out; an edge that
  never trains in time is a dropout; a neighbour whose share does not open is excluded
  (named in the masked input, logged, event ``secure-excluded``), not a reason to stop;
- ``survivors`` -> signature; ``unmask request`` -> the shares it asks for; ``end``: forget.

Core NATS is at most once: the trainer repeats a request until it is answered, and the
edge answers a repeated request with the very answer it gave first (never a second,
different one). A step the client refuses (bad signature, inconsistent request, ...) ends
the round for this edge: it answers nothing more and records ``secure-refused``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from numpy.typing import NDArray

from edge_runtime.errors import EdgeError
from edge_runtime.events import EventLog
from edge_runtime.rounds_watch import RoundsView
from fedcore import subjects
from fedcore.errors import SecAggError
from fedcore.secagg import (
    AdvertBundle,
    RoundSetup,
    SecAggClient,
    SecAggConfig,
    ShareBundle,
    SurvivorList,
    UnmaskRequest,
)
from fedcore.secagg.frame import ANSWERS, Frame, Phase
from fedcore.secagg.parts import PartSender, Request
from fedcore.wire import round_id

log = logging.getLogger(__name__)

Send = Callable[[str, bytes], Awaitable[None]]
EnrolledKeys = Callable[[], Mapping[str, ed25519.Ed25519PublicKey]]
OnAnswer = Callable[[str, int, Phase], None]


class SecAggRoundError(EdgeError):
    """An update cannot go into a secure round (not in progress here, or refused)."""


@dataclass
class _EdgeRound:
    """This edge's part in one secure round of one model."""

    round_no: int
    client: SecAggClient
    setup: bytes = b""  # the setup this state answers (a trainer restart sends another)
    model: str = ""
    answers: dict[Phase, bytes] = field(default_factory=dict)
    delivery: ShareBundle | None = None
    delta: NDArray[np.float32] | None = None
    failed: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SecAggParticipant:
    """This edge in the secure rounds of the models in ``configs``."""

    def __init__(
        self,
        edge_id: str,
        identity: ed25519.Ed25519PrivateKey,
        enrolled: EnrolledKeys,
        configs: Mapping[str, SecAggConfig],
        rounds: RoundsView,
        send: Send,
        *,
        events: EventLog | None = None,
        on_answer: OnAnswer | None = None,
        max_message: int = 1 << 62,
        request: Request | None = None,
    ) -> None:
        self.edge_id = edge_id
        self._identity = identity
        self._enrolled = enrolled
        self.configs = dict(configs)
        self.rounds = rounds
        self._out = PartSender(send, max_message, request=request)
        self.events = events or EventLog()
        self._on_answer = on_answer
        self._state: dict[str, _EdgeRound] = {}

    def handles(self, model: str) -> bool:
        return model in self.configs

    async def start(self, nc: NATS) -> None:
        """Listen to the trainer; answers larger than the server's ``max_payload`` (a
        masked input of a large model) go out in parts (:mod:`fedcore.secagg.parts`)."""
        self._out.max_message = nc.max_payload
        if self._out.request is None:
            self._out.request = nats_request(nc)
        for model in self.configs:
            await nc.subscribe(subjects.secagg_to_edge(model, self.edge_id), cb=self.on_message)

    async def on_message(self, msg: Msg) -> None:
        """A trainer request (subscription callback)."""
        parsed = subjects.parse_secagg_subject(msg.subject)
        if parsed is None or parsed[1:] != ("to", self.edge_id) or parsed[0] not in self.configs:
            return
        try:
            frame = Frame.decode(msg.data)
        except SecAggError as exc:
            log.warning("secure round: bad frame: %s", exc, extra={"model": parsed[0]})
            return
        await self.handle(parsed[0], frame)

    async def handle(self, model: str, frame: Frame) -> None:
        """Answer one request of the trainer (or remember it, or ignore it)."""
        if frame.phase is Phase.END:
            state = self._state.get(model)
            if state is not None and state.round_no == frame.round:
                del self._state[model]
            return
        if frame.phase not in ANSWERS:
            return
        if frame.phase is Phase.SETUP and not self._invited(model, frame.round):
            return  # not (yet) announced as secure for this edge: the trainer will repeat it
        state = self._state.get(model)
        if frame.phase is Phase.SETUP and (
            state is None or state.round_no != frame.round or state.setup != frame.body
        ):  # a new round, or the same number from a restarted trainer: start afresh
            state = self._new_round(model, frame.round, frame.body)
        if state is None or state.round_no != frame.round:
            return
        async with state.lock:
            await self._answer(model, state, frame)

    def _invited(self, model: str, round_no: int) -> bool:
        a = self.rounds.get(model)
        return a is not None and a.secure and a.round == round_no and a.invites(self.edge_id)

    def _new_round(self, model: str, round_no: int, setup: bytes) -> _EdgeRound:
        client = SecAggClient(self.edge_id, self._identity, self._enrolled(), self.configs[model])
        state = _EdgeRound(round_no, client, setup, model=model)
        self._state[model] = state
        return state

    async def _answer(self, model: str, state: _EdgeRound, frame: Frame) -> None:
        if frame.phase in state.answers:  # a repeated request: the same answer again
            await self._reply(model, state, frame.phase, state.answers[frame.phase])
            return
        if state.failed is not None:
            return
        try:
            body = await self._step(model, state, frame)
        except SecAggError as exc:
            self._fail(model, state, exc)
            return
        if body is not None:
            state.answers[frame.phase] = body
            await self._reply(model, state, frame.phase, body)

    async def _step(self, model: str, state: _EdgeRound, frame: Frame) -> bytes | None:
        client, body = state.client, frame.body
        if frame.phase is Phase.SETUP:
            setup = RoundSetup.from_bytes(body)
            if setup.round_id != round_id(model, frame.round):
                raise SecAggError("wrong-round", f"setup for {setup.round_id!r}")
            return client.advertise(setup).to_bytes()
        if frame.phase is Phase.ADVERT_BUNDLE:
            return client.share_keys(AdvertBundle.from_bytes(body)).to_bytes()
        if frame.phase is Phase.DELIVERY:
            if state.delivery is None:
                state.delivery = ShareBundle.from_bytes(body)
            return await self._masked(state)
        if frame.phase is Phase.SURVIVORS:
            return client.sign_survivors(SurvivorList.from_bytes(body)).to_bytes()
        return client.unmask(UnmaskRequest.from_bytes(body)).to_bytes()

    async def _masked(self, state: _EdgeRound) -> bytes | None:
        """The masked input, once both the shares and the update are here."""
        if state.delivery is None or state.delta is None:
            return None
        masked = await asyncio.to_thread(state.client.masked_input, state.delivery, state.delta)
        for peer in masked.excluded:
            why = state.client.excluded[peer]
            log.warning(
                "secure round: neighbour excluded, its share did not open (%s)",
                why,
                extra={"round": state.round_no, "edge": peer, "reason": why},
            )
            self.events.emit(
                "secure-excluded", state.model, round=state.round_no, reason=f"{peer}: {why}"
            )
        return masked.to_bytes()

    async def _reply(self, model: str, state: _EdgeRound, asked: Phase, body: bytes) -> None:
        frame = Frame(ANSWERS[asked], state.round_no, body).encode()
        await self._out.send(subjects.secagg_from_edge(model, self.edge_id), frame)
        if self._on_answer is not None:
            self._on_answer(model, state.round_no, asked)

    def _fail(self, model: str, state: _EdgeRound, exc: SecAggError) -> None:
        state.failed = exc.reason
        log.warning(
            "secure round: step refused: %s",
            exc,
            extra={"model": model, "round": state.round_no, "reason": exc.reason},
        )
        self.events.emit("secure-refused", model, round=state.round_no, reason=exc.reason)

    async def submit(self, model: str, round_no: int, delta: NDArray[Any]) -> None:
        """Hand over this edge's update for round ``round_no``: it leaves the edge only
        masked, as soon as the neighbours' shares are here. Raises
        :class:`SecAggRoundError` when this edge is not in that round (any more)."""
        state = self._state.get(model)
        if state is None or state.round_no != round_no:
            raise SecAggRoundError(
                f"secure round {round_no} of {model} is not in progress on this edge "
                "(its setup never came, or the round ended): the update stays here"
            )
        async with state.lock:
            if state.failed is not None:
                raise SecAggRoundError(
                    f"secure round {round_no} of {model} was refused here ({state.failed})"
                )
            if state.delta is not None:
                raise SecAggRoundError(f"an update for secure round {round_no} was handed over")
            state.delta = np.asarray(delta, dtype=np.float32)
            try:
                body = await self._masked(state)
            except SecAggError as exc:
                self._fail(model, state, exc)
                raise SecAggRoundError(f"masking refused: {exc}") from None
            if body is not None:
                state.answers[Phase.DELIVERY] = body
                await self._reply(model, state, Phase.DELIVERY, body)


def nats_request(nc: NATS) -> Request:
    """``nc.request`` as :class:`fedcore.secagg.parts.PartSender` wants it: the answer's
    body, NATS failures as ``TimeoutError``."""

    async def request(subject: str, data: bytes, timeout_s: float) -> bytes:
        try:
            msg = await nc.request(subject, data, timeout=timeout_s)
        except nats.errors.Error as exc:
            raise TimeoutError(f"no answer on {subject}: {exc!r}") from None
        return bytes(msg.data)

    return request
