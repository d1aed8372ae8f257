"""The trainer's view of the edge registry file, and its mirror in NATS KV.

:class:`RegistryFile` re-reads the file when it changes (size or modification time), so
``fedgate keys revoke`` takes effect on the next update without a restart. A file that
stops parsing keeps the last good registry in force and is logged, never half-applied.
:func:`mirror_registry` copies the records into the KV bucket ``fedgate_edges`` (one key
per edge, the record as compact JSON) for the gateway and dashboards; the file stays the
source of truth.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from fedcore.enrollment import EdgeRegistry, load_registry
from fedcore.errors import EnrollmentError
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


async def edges_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The ``fedgate_edges`` KV bucket, created if missing."""
    try:
        return await js.key_value(EDGES_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=EDGES_BUCKET,
                history=5,
                storage=StorageType.FILE,
                replicas=replicas,
                description="fedgate: enrolled edges (mirror of the trainer's registry file)",
            )
        )


async def mirror_registry(kv: KeyValue, registry: EdgeRegistry) -> int:
    """Make the bucket hold exactly ``registry``; returns the number of keys written."""
    try:
        present = set(await kv.keys())
    except NoKeysError:
        present = set()
    written = 0
    for edge_id, record in registry.items():
        value = record.encode()
        if edge_id in present:
            entry = await kv.get(edge_id)
            if entry.value == value:
                continue
        await kv.put(edge_id, value)
        written += 1
    for stale in present - set(registry):
        await kv.delete(stale)
    return written
