"""The edges the trainer may invite into rounds: enrolled edges heard from lately.

Heartbeats are accepted only from the edge their subject names and only when the edge
registry lists it as active (:func:`fedcore.heartbeats.accept_heartbeat`); others are
logged and counted by reason in ``fedgate_trainer_heartbeats_refused_total``, so a
phantom edge (or one speaking for another) is never invited into a round. An edge silent
for ``ttl_s`` (a setting: a few of the edges' heartbeat intervals) is forgotten, and so is
one revoked since its last heartbeat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter

from fedcore.enrollment import EdgeStatus
from fedcore.heartbeats import REFUSALS, HeartbeatRefused, accept_heartbeat
from trainer.opener import EdgeDirectory

log = logging.getLogger(__name__)


class Roster:
    """Active edges by the time of their last heartbeat, for client sampling."""

    def __init__(
        self,
        edges: EdgeDirectory,
        ttl_s: float,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.edges = edges
        self.ttl_s = ttl_s
        self.clock = clock
        self.seen: dict[str, float] = {}
        self.started = clock()
        self.refused = Counter(
            "fedgate_trainer_heartbeats_refused",
            "Heartbeats dropped: malformed, naming another edge than their subject, or from "
            "an edge the registry does not list as active",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSALS:
            self.refused.labels(reason)

    def complete(self) -> bool:
        """True once heartbeats were heard for a whole TTL: the view is complete."""
        return self.clock() - self.started >= self.ttl_s

    def _active(self, edge_id: str) -> bool:
        return self.edges.current().status(edge_id) is EdgeStatus.ACTIVE

    def observe(self, subject: str, data: bytes) -> bool:
        """Record one heartbeat; False (logged and counted) when it is refused."""
        try:
            beat = accept_heartbeat(subject, data, self._active)
        except HeartbeatRefused as exc:
            self.refused.labels(exc.reason).inc()
            log.warning("heartbeat refused: %s", exc, extra={"subject": subject})
            return False
        self.seen[beat.edge_id] = self.clock()
        return True

    async def on_heartbeat(self, msg: Msg) -> None:
        self.observe(msg.subject, msg.data)

    def alive(self) -> list[str]:
        """Active edges heard from within the TTL; the others are forgotten."""
        now = self.clock()
        for edge_id in [e for e, t in self.seen.items() if now - t > self.ttl_s]:
            del self.seen[edge_id]
        return sorted(e for e in self.seen if self._active(e))
