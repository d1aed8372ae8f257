"""NATS subjects, streams and buckets: the one place their names are spelled."""

from __future__ import annotations

HEARTBEAT_PREFIX = "fedgate.fleet.heartbeat"
LEAVE_PREFIX = "fedgate.fleet.leave"


def heartbeat(edge_id: str) -> str:
    """Subject an edge publishes its heartbeat on."""
    return f"{HEARTBEAT_PREFIX}.{edge_id}"


def leave(edge_id: str) -> str:
    """Subject an edge announces a clean shutdown on."""
    return f"{LEAVE_PREFIX}.{edge_id}"


HEARTBEAT_ALL = f"{HEARTBEAT_PREFIX}.*"
LEAVE_ALL = f"{LEAVE_PREFIX}.*"

FEEDBACK_PREFIX = "fedgate.feedback"


def feedback(model: str) -> str:
    """Subject the gateway sends feedback labels for ``model`` on (a request: edges reply)."""
    return f"{FEEDBACK_PREFIX}.{model}"
