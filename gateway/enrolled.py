"""The edges the gateway may route to: the active edges of the trainer's registry.

The trainer mirrors its edge registry into the KV bucket ``fedgate_edges`` (one key per
edge, the record as JSON; ``trainer.registry.mirror_registry``) and keeps the mirror
current when ``fedgate keys enroll|revoke`` changes the file. The gateway watches it:
a heartbeat of an edge that is not listed as active is refused
(:func:`fedcore.heartbeats.accept_heartbeat`), and an edge that is revoked or removed
leaves the fleet at once. Until the mirror has been read, no edge is enrolled (a gateway
that cannot tell routes nowhere rather than anywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from fedcore.edge_id import is_edge_id
from fedcore.enrollment import decode_record
from fedcore.errors import EnrollmentError
from fedcore.transport import EDGES_BUCKET

log = logging.getLogger(__name__)


class EnrolledEdges:
    """Active edge ids from the registry mirror; ``on_removed`` is told of each edge that
    stops being active (revoked or deleted)."""

    def __init__(self, on_removed: Callable[[str], None] | None = None) -> None:
        self._active: set[str] = set()
        self.loaded = False
        self.on_removed = on_removed

    def allows(self, edge_id: str) -> bool:
        """Whether ``edge_id`` is an active, enrolled edge."""
        return edge_id in self._active

    def active(self) -> set[str]:
        return set(self._active)

    def apply(self, key: str, value: bytes | None, deleted: bool) -> None:
        """One entry of the mirror: a record (active or revoked) or a deletion; a key that
        is no edge id never makes an edge active."""
        active = False
        if not is_edge_id(key):
            log.warning("edge registry mirror key %r is not an edge id: ignored", key)
        elif not deleted and value is not None:
            try:
                active = not decode_record(value).revoked
            except EnrollmentError as exc:
                log.warning("unreadable edge record %r: %s", key, exc)
        if active:
            self._active.add(key)
            return
        if key in self._active:
            self._active.discard(key)
            log.warning("edge %s is no longer enrolled; it leaves the fleet", key)
            if self.on_removed is not None:
                self.on_removed(key)


async def watch_enrolled(
    js: JetStreamContext, edges: EnrolledEdges, stop: asyncio.Event, retry_s: float = 1.0
) -> None:
    """Follow ``fedgate_edges`` until ``stop``; waits for the bucket if it is not there."""
    while not stop.is_set():
        try:
            kv = await js.key_value(EDGES_BUCKET)
            watcher = await kv.watchall()
        except (nats.js.errors.BucketNotFoundError, nats.errors.Error, TimeoutError):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)
            continue
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=retry_s)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # the end of the initial values
                    if not edges.loaded:
                        log.info("enrolled edges: %s", ", ".join(sorted(edges.active())))
                    edges.loaded = True
                    continue
                edges.apply(entry.key, entry.value, entry.operation in ("DEL", "PURGE"))
        except nats.errors.Error as exc:
            log.warning("enrolled edges watch interrupted: %r; watching again", exc)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
