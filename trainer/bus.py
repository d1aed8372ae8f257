"""The trainer creates the update transport on JetStream: stream, object bucket, consumer.

The trainer owns these (edges only publish), so it creates or updates them at start from
one :class:`fedcore.transport.StreamSpec`. The consumer is durable and pull-based, with
explicit acks, no delivery limit (an update the trainer could not handle yet is retried,
never silently dropped; bad ones are terminated explicitly) and a bounded number of
unacknowledged messages.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from fedcore.replicas import ReplicasError, creation_error, ensure_replicas
from fedcore.transport import TRAINER_CONSUMER, StreamSpec, updates_filter


def updates_stream_config(spec: StreamSpec) -> StreamConfig:
    """The stream config for ``spec``: file storage, retention by age, deduplication,
    bounded in bytes and per subject (one model of one edge), new messages refused when
    full."""
    return StreamConfig(
        name=spec.name,
        description="fedgate: sealed model updates from edges (Nats-Msg-Id = update id)",
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_bytes=spec.max_bytes,
        max_msgs_per_subject=spec.max_msgs_per_subject,
        max_age=spec.max_age_s,
        max_msg_size=spec.max_msg_size,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=spec.replicas,
        deny_delete=True,
        deny_purge=False,
    )


async def ensure_updates_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    """Create the updates stream, or bring an existing one to ``spec``."""
    config = updates_stream_config(spec)
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except APIError as exc:
            raise creation_error(spec.name, spec.replicas, exc) from None
        return
    have = info.config.num_replicas or 1
    try:  # never scaled down here: fewer replicas is an operator's decision
        await js.update_stream(config.evolve(num_replicas=max(have, spec.replicas)))
    except APIError as exc:
        if have >= spec.replicas:
            raise
        raise ReplicasError(spec.name, have, spec.replicas, exc.description or str(exc)) from None


async def ensure_object_bucket(js: JetStreamContext, spec: StreamSpec) -> ObjectStore:
    """The object bucket for large updates, created (file storage, same age, at most
    ``object_max_bytes``) if missing, else brought to that size limit and scaled up to the
    spec's replicas if it has fewer."""
    try:
        store = await js.object_store(spec.object_bucket)
    except BucketNotFoundError:
        config = ObjectStoreConfig(
            description="fedgate: sealed updates too large for one message",
            ttl=spec.max_age_s,
            storage=StorageType.FILE,
            replicas=spec.replicas,
            max_bytes=spec.object_max_bytes,
        )
        try:
            return await js.create_object_store(spec.object_bucket, config)
        except APIError as exc:
            raise creation_error(f"OBJ_{spec.object_bucket}", spec.replicas, exc) from None
    stream = f"OBJ_{spec.object_bucket}"
    info = await js.stream_info(stream)
    if info.config.max_bytes != spec.object_max_bytes:
        await js.update_stream(info.config.evolve(max_bytes=spec.object_max_bytes))
    await ensure_replicas(js, stream, spec.replicas)
    return store


def updates_consumer_config(
    *,
    durable: str = TRAINER_CONSUMER,
    model: str | None = None,
    ack_wait_s: float = 30.0,
    max_ack_pending: int = 256,
) -> ConsumerConfig:
    """The trainer's durable pull consumer over every update (or one model's)."""
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        description="fedgate trainer: verify, decrypt, fold",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        filter_subject=updates_filter(model),
        max_ack_pending=max_ack_pending,
    )


async def ensure_transport(js: JetStreamContext, spec: StreamSpec) -> ObjectStore:
    """Stream and object bucket; returns the bucket."""
    await ensure_updates_stream(js, spec)
    return await ensure_object_bucket(js, spec)
