"""One way for a service to connect to NATS and one way to let go of it.

Every service connects with its settings (:class:`fedcore.settings.ServiceSettings`): all
the URLs of a cluster, its user and password file, its own inbox prefix (its NATS user may
subscribe to no other), TLS when configured, and reconnects forever. On stop it flushes what
it published and closes, each with a deadline; it does not drain: a drain waits for the
pending queues of subscriptions that nothing reads once the service's loops have stopped,
and ran into its timeout on every stop. What was not acknowledged is redelivered by
JetStream, so nothing is lost by closing.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats
from nats.aio.client import Client as NATS

from fedcore.settings import ServiceSettings

FLUSH_TIMEOUT_S = 2.0
CLOSE_TIMEOUT_S = 5.0


async def connect_service(settings: ServiceSettings, name: str) -> NATS:
    """A connection for the service ``name`` as its settings describe it."""
    return await nats.connect(
        servers=settings.nats_url.split(","),
        user=settings.nats_user,
        password=settings.nats_password(),
        name=name,
        max_reconnect_attempts=-1,
        inbox_prefix=settings.nats_inbox_prefix(),
        tls=settings.nats_tls_context(),
    )


async def close_service(nc: NATS) -> None:
    """Flush, then close; each bounded, neither raises (a stop must always finish)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.flush(), FLUSH_TIMEOUT_S)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
