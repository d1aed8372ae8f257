"""The fleet from the bus: heartbeats and leaves of enrolled edges, into :class:`Fleet`.

A heartbeat counts only if it came on the subject of the edge it names (NATS lets an edge
publish only its own) and that edge is active in the trainer's registry (its KV mirror,
:mod:`gateway.enrolled`); any other is dropped, logged and counted by reason in
``fedgate_gateway_heartbeats_refused_total``. An edge that is revoked leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fedcore import subjects
from fedcore.heartbeats import HeartbeatRefused, accept_heartbeat
from gateway.enrolled import EnrolledEdges, watch_enrolled
from gateway.fleet import Fleet
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class FleetFeed:
    """Keeps ``fleet`` fed from NATS until :meth:`close`."""

    def __init__(self, fleet: Fleet, metrics: GatewayMetrics) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.enrolled = EnrolledEdges(on_removed=fleet.leave)
        self._stop = asyncio.Event()
        self._subs: list[Subscription] = []
        self._watch: asyncio.Task[None] | None = None

    def on_heartbeat(self, subject: str, data: bytes) -> bool:
        """Observe one heartbeat; False (logged and counted) when it is refused."""
        try:
            beat = accept_heartbeat(subject, data, self.enrolled.allows)
        except HeartbeatRefused as exc:
            self.metrics.heartbeats_refused.labels(exc.reason).inc()
            log.warning("heartbeat refused: %s", exc, extra={"subject": subject})
            return False
        self.fleet.observe(beat)
        return True

    async def start(self, nc: NATS) -> None:
        """Watch the registry mirror and subscribe to heartbeats and leaves."""

        async def on_heartbeat(msg: Msg) -> None:
            self.on_heartbeat(msg.subject, msg.data)

        async def on_leave(msg: Msg) -> None:
            self.fleet.leave(msg.subject.rsplit(".", 1)[-1])

        self._watch = asyncio.create_task(watch_enrolled(nc.jetstream(), self.enrolled, self._stop))
        self._subs = [
            await nc.subscribe(subjects.HEARTBEAT_ALL, cb=on_heartbeat),
            await nc.subscribe(subjects.LEAVE_ALL, cb=on_leave),
        ]

    async def close(self) -> None:
        self._stop.set()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._watch, 5)
