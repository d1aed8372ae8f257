"""Streams, KV buckets and object stores at the configured number of replicas.

Every service that creates a JetStream asset creates it with its ``nats_replicas``
setting (1 on one server, 3 on a 3-node cluster). An asset that already exists with
fewer replicas than configured (made before the setting was raised, or by an older
release) is scaled up in place with a stream update: JetStream copies the data to the
new peers while the stream keeps serving. When the servers refuse (fewer servers than
replicas, a single server without clustering, no permission to update), the service
stops with :class:`ReplicasError` naming the stream, both counts and the server's
reason, instead of running on a single copy it was told not to rely on. An asset with
more replicas than configured is left alone: scaling down is an operator's decision.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.js.client import JetStreamContext
from nats.js.errors import APIError

from fedcore.errors import FedgateError

log = logging.getLogger(__name__)

ALLOWED = (1, 3, 5)
"""Raft groups of an odd size: 3 tolerate one lost server, 5 two."""


class ReplicasError(FedgateError):
    """A stream cannot be had at the configured number of replicas."""

    def __init__(self, stream: str, have: int | None, want: int, detail: str) -> None:
        self.stream = stream
        self.have = have
        self.want = want
        self.detail = detail
        now = "" if have is None else f"has {have} replica(s), "
        super().__init__(
            f"stream {stream} {now}configured {want} (nats_replicas): {detail}; "
            f"check that the JetStream cluster has at least {want} servers, or run "
            f"`nats stream edit {stream} --replicas {want}` by hand"
        )


def check_replicas(replicas: int) -> int:
    """``replicas`` if it is 1, 3 or 5; ValueError otherwise."""
    if replicas not in ALLOWED:
        raise ValueError(f"replicas {replicas} is not 1, 3 or 5")
    return replicas


async def ensure_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Bring the existing ``stream`` (``KV_<bucket>``, ``OBJ_<bucket>`` or a plain stream)
    up to ``replicas``. A no-op at 1 (nothing to check) and when it has as many or more."""
    if replicas <= 1:
        return
    info = await js.stream_info(stream)
    have = info.config.num_replicas or 1
    if have >= replicas:
        return
    config = info.config.evolve(num_replicas=replicas)
    try:
        await js.update_stream(config)
    except APIError as exc:
        raise ReplicasError(stream, have, replicas, exc.description or str(exc)) from None
    except nats.errors.TimeoutError:  # a permissions violation never gets an answer
        raise ReplicasError(
            stream, have, replicas, "no answer to the update (may this user update it?)"
        ) from None
    log.warning(
        "stream scaled up to the configured replicas",
        extra={"stream": stream, "from": have, "to": replicas},
    )


def creation_error(stream: str, replicas: int, exc: APIError) -> ReplicasError:
    """The error for a create that the servers refused at ``replicas``."""
    return ReplicasError(stream, None, replicas, exc.description or str(exc))
