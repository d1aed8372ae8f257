"""Retry the round loop's idempotent NATS writes through a broker restart.

Announcing a round, uploading a version and writing its lineage and round record are
idempotent puts; a NATS restart (or a cluster election) makes them time out for a few
seconds. They are tried again with backoff for ``within_s`` instead of stopping the
trainer, which the launcher would restart into the same state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors

from fedcore.loops import Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT = (TimeoutError, nats.errors.Error)


async def retry_transient(
    op: Callable[[], Awaitable[T]], what: str, within_s: float = 60.0, base_s: float = 0.5
) -> T:
    """``await op()``, again after a transient NATS failure until ``within_s`` passed (then
    the last failure is raised)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    backoff = Backoff(base_s, max(base_s, 5.0))
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            delay = backoff.next()
            if loop.time() + delay > deadline:
                raise
            log.warning("%s failed; retrying", what, extra={"error": repr(exc), "in_s": delay})
            await asyncio.sleep(delay)
