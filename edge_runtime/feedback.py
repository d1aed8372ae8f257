"""Feedback labels on the edge: answer the gateway's requests on ``fedgate.feedback.<model>``.

The gateway sends a label to the edge that served the request, on
``fedgate.feedback.<model>-<edge>``, when the client brought the feedback token of that
response; otherwise to the whole fleet on ``fedgate.feedback.<model>``. The edge whose
spool holds the request id (bound to the key that made the request: ``<key>/<id>``) joins
the label and replies ``joined``, an edge holding its tombstone replies ``expired``;
on the fleet's subject every other edge stays silent, on its own an edge says
``unknown``. A sample may still sit in the capture
writer's queue when its feedback arrives (the writer flushes every 50 ms), so an id not
found is looked up once more after ``retry_after_s`` before staying silent. The label
travels to the edge, never from it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from edge_runtime.spool import JoinResult, Spool
from fedcore import subjects
from fedcore.models import get_spec
from fedcore.task import Label, check_label
from fedcore.wire import FeedbackReply, FeedbackRequest, WireError

log = logging.getLogger(__name__)

Joined = Callable[[str, str], None]
"""Called with (model, request id) after a label is joined."""


class FeedbackResponder:
    """Joins feedback labels into the spools of the models this edge serves."""

    def __init__(
        self,
        edge_id: str,
        spools: Mapping[str, Spool],
        *,
        retry_after_s: float = 0.15,
        max_concurrent: int = 64,
        on_joined: Joined | None = None,
    ) -> None:
        self.edge_id = edge_id
        self.spools = dict(spools)
        self.retry_after_s = retry_after_s
        self.on_joined = on_joined
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrent)

    async def start(self, nc: NATS) -> None:
        """Subscribe to the feedback subject of every spooled model."""
        for model in self.spools:
            self._subs.append(await nc.subscribe(subjects.feedback(model), cb=self._on_msg))
            own = subjects.feedback_to_edge(model, self.edge_id)
            self._subs.append(await nc.subscribe(own, cb=self._on_own_msg))

    async def stop(self) -> None:
        """Unsubscribe and wait (briefly) for labels being joined."""
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    async def handle(self, data: bytes, directed: bool = False) -> FeedbackReply | None:
        """The reply to one feedback message, or None to stay silent (``directed``: sent
        to this edge alone, which answers ``unknown`` rather than nothing)."""
        try:
            request = FeedbackRequest.decode(data)
        except WireError as exc:
            log.warning("dropped feedback: %s", exc)
            return None
        spool = self.spools.get(request.model)
        if spool is None:
            return None
        spec = get_spec(request.model)
        try:
            label = check_label(spec.task, spec.target.width, request.label)
        except ValueError as exc:
            log.warning("dropped feedback: label %s", exc, extra={"model": request.model})
            return None
        result = await self._join(spool, request.spool_id, label, request.weight)
        if result is JoinResult.UNKNOWN:
            return FeedbackReply(edge_id=self.edge_id, status="unknown") if directed else None
        if result is JoinResult.JOINED and self.on_joined is not None:
            self.on_joined(request.model, request.id)
        return FeedbackReply(edge_id=self.edge_id, status=result.value)

    async def _join(self, spool: Spool, request_id: str, label: Label, weight: float) -> JoinResult:
        args = (request_id, label, weight)
        result = await asyncio.to_thread(spool.join_label, *args)
        if result is JoinResult.UNKNOWN and self.retry_after_s > 0:
            await asyncio.sleep(self.retry_after_s)
            result = await asyncio.to_thread(spool.join_label, *args)
        return result

    async def _on_msg(self, msg: Msg) -> None:
        await self._spawn(msg, directed=False)

    async def _on_own_msg(self, msg: Msg) -> None:
        await self._spawn(msg, directed=True)

    async def _spawn(self, msg: Msg, directed: bool) -> None:
        # A message whose id is not here yet waits retry_after_s: handle each in its own
        # task so one such wait does not hold up the labels behind it.
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg, directed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, directed: bool) -> None:
        try:
            reply = await self.handle(msg.data, directed)
            if reply is not None and msg.reply:
                await msg.respond(reply.encode())
        except Exception:  # one bad message must not end the subscription
            log.exception("feedback handling failed", extra={"subject": msg.subject})
        finally:
            self._slots.release()
