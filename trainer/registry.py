"""The trainer's view of the edge registry file, and its mirror in NATS KV.

:class:`RegistryFile` re-reads the file when it changes (size or modification time), so
``fedgate keys revoke`` takes effect on the next update without a restart. A file that
stops parsing keeps the last good registry in force and is logged, never half-applied.
:func:`mirror_registry` copies the records into the KV bucket ``fedgate_edges`` (one key
per edge, the record as compact JSON) for the gateway (which routes only to the active
edges it lists, :mod:`gateway.enrolled`) and dashboards; :func:`keep_mirrored` copies it
again whenever the file changes. The file stays the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import nats.errors
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from fedcore.enrollment import EdgeRegistry, load_registry
from fedcore.errors import EnrollmentError
from fedcore.kv import kv_bucket, kv_keys
from fedcore.transport import EDGES_BUCKET

log = logging.getLogger(__name__)


class RegistryFile:
    """The registry at ``path``, reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._registry = EdgeRegistry()
        self.reload()

    def _file_stamp(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size

    def reload(self) -> EdgeRegistry:
        """Read the file now; raises ``EnrollmentError`` if it is missing or malformed."""
        stamp = self._file_stamp() if self.path.exists() else None
        self._registry = load_registry(self.path)
        self._stamp = stamp
        return self._registry

    def current(self) -> EdgeRegistry:
        """The registry, re-read first if the file changed since the last read."""
        try:
            stamp = self._file_stamp()
        except OSError:
            stamp = None
        if stamp != self._stamp:
            try:
                self.reload()
                log.info("edge registry reloaded", extra={"edges": len(self._registry)})
            except EnrollmentError as exc:
                self._stamp = stamp  # do not retry the same broken file on every update
                log.error(
                    "edge registry not reloaded; keeping the last good one",
                    extra={"reason": exc.reason, "detail": exc.detail},
                )
        return self._registry

    def active_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        """The active edges' public keys, from the current registry."""
        return self.current().active_keys()


async def edges_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The ``fedgate_edges`` KV bucket, created if missing (scaled up to ``replicas``)."""
    config = KeyValueConfig(
        bucket=EDGES_BUCKET,
        history=5,
        storage=StorageType.FILE,
        description="fedgate: enrolled edges (mirror of the trainer's registry file)",
    )
    return await kv_bucket(js, EDGES_BUCKET, replicas, config)


async def mirror_registry(
    js: JetStreamContext, registry: EdgeRegistry, *, replicas: int = 1
) -> int:
    """Make ``fedgate_edges`` hold exactly ``registry``; returns the number of keys written."""
    kv = await edges_bucket(js, replicas=replicas)
    written = 0
    present: set[str] = set()
    for key in await kv_keys(js, EDGES_BUCKET):
        try:
            entry = await kv.get(key)
        except NotFoundError:  # deleted
            continue
        present.add(key)
        record = registry.get(key)
        if record is not None and entry.value == record.encode():
            continue
        if record is None:
            await kv.delete(key)
        else:
            await kv.put(key, record.encode())
            written += 1
    for edge_id in set(registry) - present:
        await kv.put(edge_id, registry[edge_id].encode())
        written += 1
    return written


async def keep_mirrored(
    js: JetStreamContext,
    registry: RegistryFile,
    stop: asyncio.Event,
    *,
    interval_s: float = 1.0,
    replicas: int = 1,
) -> None:
    """Mirror ``registry`` again each time its file changes, until ``stop`` (a revocation
    reaches the gateway within about ``interval_s``). NATS trouble is logged and retried."""
    mirrored: EdgeRegistry | None = None
    while not stop.is_set():
        current = registry.current()
        if current is not mirrored:
            try:
                written = await mirror_registry(js, current, replicas=replicas)
                mirrored = current
                if written:
                    log.info("edge registry mirrored", extra={"written": written})
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("edge registry not mirrored yet: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
