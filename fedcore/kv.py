"""Small helpers over NATS KV buckets shared by every service."""

from __future__ import annotations

from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue


async def kv_bucket(js: JetStreamContext, name: str, replicas: int = 1) -> KeyValue:
    """A KV bucket, created on first use."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=name, replicas=replicas))


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
