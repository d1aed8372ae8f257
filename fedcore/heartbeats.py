"""Heartbeats as the gateway and the trainer accept them: from an enrolled edge, about itself.

NATS permissions let each edge publish only on its own subject
``fedgate.fleet.heartbeat.<edge>`` (:mod:`fedgate.nats_accounts`), so the subject is what
authenticated the sender. A heartbeat whose payload names another edge is an edge
speaking for someone else (issue #16, finding 3: edge-2 claimed edge-1 with its own URL
and got edge-1's site traffic), and a heartbeat of an edge the registry does not list as
active is a phantom or a revoked edge: both are refused with a reason the services count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from fedcore import subjects
from fedcore.errors import ReasonedError
from fedcore.wire import Heartbeat, WireError, decode_heartbeat

HeartbeatRefusal = Literal["malformed", "subject-mismatch", "not-enrolled"]
REFUSALS: tuple[HeartbeatRefusal, ...] = get_args(HeartbeatRefusal)
"""Why a heartbeat is refused (the ``reason`` label of the services' refusal counters)."""


class HeartbeatRefused(ReasonedError[HeartbeatRefusal]):
    """A heartbeat was refused; ``reason`` is one of :data:`REFUSALS`."""


def subject_edge(subject: str) -> str | None:
    """The edge id a heartbeat subject names, or None when it is not one."""
    prefix = subjects.HEARTBEAT_PREFIX + "."
    if not subject.startswith(prefix):
        return None
    edge = subject[len(prefix) :]
    return edge if edge and "." not in edge else None


def accept_heartbeat(subject: str, data: bytes, enrolled: Callable[[str], bool]) -> Heartbeat:
    """The heartbeat ``data`` received on ``subject``, if its payload names the edge of the
    subject and ``enrolled`` says that edge is active; :class:`HeartbeatRefused` otherwise."""
    try:
        beat = decode_heartbeat(data)
    except WireError as exc:
        raise HeartbeatRefused("malformed", str(exc)) from None
    sender = subject_edge(subject)
    if sender != beat.edge_id:
        raise HeartbeatRefused(
            "subject-mismatch", f"heartbeat names edge {beat.edge_id!r} but came on {subject!r}"
        )
    if not enrolled(beat.edge_id):
        raise HeartbeatRefused("not-enrolled", f"edge {beat.edge_id!r} is not an active edge")
    return beat
