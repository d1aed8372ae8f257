"""NATS subjects, streams and buckets: the one place their names are spelled."""

from __future__ import annotations

from fedcore.errors import ConfigError

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


def feedback_to_edge(model: str, edge_id: str) -> str:
    """Subject the gateway sends a label for ``model`` to one edge on (it always replies).

    One token, ``<model>-<edge>`` (model names have no ``-``), so that the permissions of
    ``fedgate.feedback.*`` cover it."""
    return f"{FEEDBACK_PREFIX}.{model}-{edge_id}"


SECAGG_PREFIX = "fedgate.secagg"


def secagg_to_edge(model: str, edge_id: str) -> str:
    """Subject the trainer sends ``edge_id`` its secure-aggregation messages for ``model`` on."""
    return f"{SECAGG_PREFIX}.{model}.to.{edge_id}"


def secagg_from_edge(model: str, edge_id: str) -> str:
    """Subject ``edge_id`` answers the trainer on in a secure round of ``model``."""
    return f"{SECAGG_PREFIX}.{model}.from.{edge_id}"


SECAGG_FROM_ALL = f"{SECAGG_PREFIX}.*.from.*"


def parse_secagg_subject(subject: str) -> tuple[str, str, str] | None:
    """``(model, direction, edge)`` of a secure-aggregation subject (direction ``to`` or
    ``from``), or None when ``subject`` is not one."""
    parts = subject.split(".")
    if len(parts) != 5 or ".".join(parts[:2]) != SECAGG_PREFIX or parts[3] not in ("to", "from"):
        return None
    return parts[2], parts[3], parts[4]


INBOX_PREFIX = "_INBOX_"
"""Each NATS user's replies and JetStream deliveries go to ``_INBOX_<user>.>``: its own
prefix, which the deployment's permissions let only that user subscribe to (the shared
``_INBOX.>`` let an edge read the trainer's pull deliveries)."""


def inbox_prefix(user: str) -> str:
    """The inbox prefix of NATS user ``user`` (``nats.connect(inbox_prefix=...)``)."""
    if not user or any(c in user for c in ".*> \t\r\n"):
        raise ConfigError(f"NATS user {user!r} cannot name an inbox subject token")
    return f"{INBOX_PREFIX}{user}"


def inbox_all(user: str) -> str:
    """Every subject of ``user``'s inboxes: what it (and only it) may subscribe to."""
    return f"{inbox_prefix(user)}.>"
