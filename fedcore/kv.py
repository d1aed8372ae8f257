"""Small helpers over NATS KV buckets shared by every service."""

from __future__ import annotations

from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError
from nats.js.kv import KeyValue

from fedcore.replicas import creation_error, ensure_replicas


async def kv_bucket(
    js: JetStreamContext, name: str, replicas: int = 1, config: KeyValueConfig | None = None
) -> KeyValue:
    """A KV bucket, created on first use with ``replicas`` (``config``, when given, for its
    other values); an existing one with fewer replicas is scaled up
    (:func:`fedcore.replicas.ensure_replicas`)."""
    try:
        kv = await js.key_value(name)
    except BucketNotFoundError:
        base = config or KeyValueConfig(bucket=name)
        try:
            return await js.create_key_value(base.evolve(bucket=name, replicas=replicas))
        except APIError as exc:
            raise creation_error(f"KV_{name}", replicas, exc) from None
    await ensure_replicas(js, f"KV_{name}", replicas)
    return kv


async def kv_keys(js: JetStreamContext, bucket: str, pattern: str = ">") -> list[str]:
    """Keys of a KV bucket matching ``pattern``, deleted ones included, sorted.

    Read from the stream's per-subject state (one request, no watcher, so no race with
    the watcher's end-of-data marker); callers skip deleted keys when they ``get`` them.
    At most the server's subject-detail limit (100,000) come back.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
    subjects = info.state.subjects or {}
    return sorted(s.removeprefix(prefix) for s in subjects)
