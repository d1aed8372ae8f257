"""Which gateway replica moves rollouts on: a lease in KV, renewed by compare-and-set.

Every gateway applies the traffic split its rollout record calls for, but only the holder of
the lease decides (stages, gates, promote, roll back) and writes the desired versions, so
several replicas never make different decisions from different counts. The lease is key
``=lease.controller`` of the rollouts bucket; its value names the holder. The holder renews
it every tick with ``update(last=revision)``. Another replica takes it over when the key's
revision has not moved for ``ttl_s`` of *its own* monotonic clock (so clocks of different
machines never need to agree), again with compare-and-set, so of several candidates exactly
one wins. A holder that loses a compare-and-set has lost the lease and stops deciding at
once; one that stops cleanly deletes the key so another takes over on its next tick.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

LEASE_KEY = "=lease.controller"
"""Key of the rollouts bucket that names the acting rollout controller."""


@dataclass
class Lease:
    """This replica's view of the lease: ``holding`` after :meth:`hold` says so."""

    kv: KeyValue
    holder: str
    ttl_s: float = 3.0
    clock: Callable[[], float] = time.monotonic
    holding: bool = False
    revision: int | None = None
    _seen: tuple[int, float] | None = field(default=None, repr=False)  # (revision, seen at)

    async def hold(self) -> bool:
        """Renew the lease, or take it when free or abandoned; True while this replica holds
        it. NATS errors count as not holding (the next tick tries again)."""
        try:
            if self.holding and self.revision is not None:
                return await self._renew()
            return await self._try_take()
        except (NatsError, TimeoutError) as exc:
            self._lose(f"lease unreadable: {exc!r}")
            return False

    async def _renew(self) -> bool:
        assert self.revision is not None
        try:
            self.revision = await self.kv.update(LEASE_KEY, self._value(), last=self.revision)
        except KeyWrongLastSequenceError:
            self._lose("another replica took the lease")
            return False
        return True

    async def _try_take(self) -> bool:
        try:
            entry = await self.kv.get(LEASE_KEY)
        except KeyNotFoundError:  # never held, or released (deleted)
            return await self._take(None)
        revision = int(entry.revision or 0)
        now = self.clock()
        if self._seen is None or self._seen[0] != revision:
            self._seen = (revision, now)  # alive: its holder moved it since we last looked
            return False
        if now - self._seen[1] < self.ttl_s:
            return False
        return await self._take(revision)

    async def _take(self, revision: int | None) -> bool:
        try:
            if revision is None:
                self.revision = await self.kv.create(LEASE_KEY, self._value())
            else:
                self.revision = await self.kv.update(LEASE_KEY, self._value(), last=revision)
        except KeyWrongLastSequenceError:
            return False  # another replica was faster
        except NatsError as exc:  # create on a key that exists (a race): not ours
            log.debug("lease not taken: %r", exc)
            return False
        self.holding = True
        log.info("this gateway (%s) now moves rollouts on", self.holder)
        return True

    def _lose(self, why: str) -> None:
        if self.holding:
            log.warning("this gateway (%s) no longer moves rollouts on: %s", self.holder, why)
        self.holding = False
        self.revision = None
        self._seen = None

    async def release(self) -> None:
        """Give the lease up (a clean stop): another replica takes it on its next tick."""
        if not self.holding or self.revision is None:
            return
        try:
            await self.kv.delete(LEASE_KEY, last=self.revision)
        except (NatsError, TimeoutError) as exc:
            log.warning("lease not released (it expires in %.0f s): %r", self.ttl_s, exc)
        self.holding = False
        self.revision = None

    def _value(self) -> bytes:
        return json.dumps({"holder": self.holder}).encode()


async def lease_holder(kv: KeyValue) -> str | None:
    """The replica named by the lease, if any (for status and tests)."""
    try:
        entry = await kv.get(LEASE_KEY)
    except KeyNotFoundError:
        return None
    try:
        holder = json.loads(entry.value or b"{}").get("holder")
    except ValueError:
        return None
    return holder if isinstance(holder, str) else None
