"""The NATS account of a deployment: one user per service and per edge, least privilege.

:func:`render_accounts` writes the ``accounts.conf`` that ``compose/nats/nats.conf`` and the
Kubernetes NATS cluster include. Every user gets an allow list (anything not listed is
refused); subjects, streams and buckets come from :mod:`fedcore` so they are spelled once.

- An edge publishes only its own heartbeat, leave and update subjects, may store large
  updates in the updates object store, reads the round announcements, the signed model
  versions and the desired versions (rollouts), receives the feedback of its models and
  answers it (``allow_responses``).
- The gateway reads heartbeats, sends feedback requests and reads the rounds, round log
  and lineage buckets and the model versions' manifests; it owns the rollout buckets
  (rollout records, and the desired versions that edges read).
- The trainer manages JetStream and its buckets; it can neither speak for an edge nor
  read the feedback labels (raw labels stay with the edges).

Passwords are ``$NATS_PASSWORD_<USER>`` references resolved from the server's environment.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedcore import subjects, transport
from fedcore.artifact_store import MODELS_BUCKET
from fedcore.subjects import FEEDBACK_PREFIX
from fedcore.wire import (
    DESIRED_BUCKET,
    LINEAGE_BUCKET,
    ROLLOUTS_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
    check_edge_id,
)

ACCOUNT = "FEDGATE"
INBOX = "_INBOX.>"
STREAM_NAMES = "$JS.API.STREAM.NAMES"
"""nats.py looks a stream up by subject before a watch or an object download (names only)."""


def password_var(user: str) -> str:
    """The environment variable holding ``user``'s password (``edge-1`` -> NATS_PASSWORD_EDGE_1)."""
    return "NATS_PASSWORD_" + user.upper().replace("-", "_")


def _read_stream(stream: str) -> list[str]:
    """JetStream API subjects to read (get, watch, download) one stream and nothing else."""
    api = "$JS.API"
    return [
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _updates_object_put() -> list[str]:
    bucket = transport.UPDATES_OBJECT_BUCKET
    stream = f"OBJ_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$O.{bucket}.C.>",
        f"$O.{bucket}.M.>",
    ]


def edge_permissions(edge_id: str) -> tuple[list[str], list[str]]:
    """(publish allow, subscribe allow) of one edge."""
    check_edge_id(edge_id)
    publish = [
        subjects.heartbeat(edge_id),
        subjects.leave(edge_id),
        f"{transport.UPDATES_PREFIX}.*.{edge_id}",
        *_updates_object_put(),
        STREAM_NAMES,
        *_read_stream(f"KV_{ROUNDS_BUCKET}"),
        *_read_stream(f"OBJ_{MODELS_BUCKET}"),
        *_read_stream(f"KV_{DESIRED_BUCKET}"),
    ]
    return publish, [INBOX, f"{FEEDBACK_PREFIX}.*"]


def gateway_permissions() -> tuple[list[str], list[str]]:
    publish = [f"{FEEDBACK_PREFIX}.*", STREAM_NAMES]
    for bucket in (ROUNDS_BUCKET, ROUND_LOG_BUCKET, LINEAGE_BUCKET):  # history and rounds API
        publish += _read_stream(f"KV_{bucket}")
    publish += _read_stream(f"OBJ_{MODELS_BUCKET}")  # a rollout's version must be there
    for bucket in (ROLLOUTS_BUCKET, DESIRED_BUCKET):  # rollouts: the gateway owns these two
        publish += [
            f"$JS.API.STREAM.CREATE.KV_{bucket}",
            *_read_stream(f"KV_{bucket}"),
            f"$KV.{bucket}.>",
        ]
    return publish, [INBOX, subjects.HEARTBEAT_ALL, subjects.LEAVE_ALL]


def trainer_permissions() -> tuple[list[str], list[str], list[str], list[str]]:
    """(publish allow, publish deny, subscribe allow, subscribe deny) of the trainer."""
    buckets = ["$KV.>", "$O.>"]  # the trainer owns every bucket
    publish = ["$JS.API.>", f"$JS.ACK.{transport.UPDATES_STREAM}.>", "$JS.FC.>", *buckets]
    publish += ["fedgate.>", INBOX]
    speaks_for_edges = [
        f"{subjects.HEARTBEAT_PREFIX}.>",
        f"{subjects.LEAVE_PREFIX}.>",
        f"{transport.UPDATES_PREFIX}.>",
        f"{FEEDBACK_PREFIX}.>",
    ]
    subscribe = [INBOX, "fedgate.>", *buckets]
    return publish, speaks_for_edges, subscribe, [f"{FEEDBACK_PREFIX}.>"]


def _list(items: Sequence[str], indent: str) -> str:
    body = ",\n".join(f'{indent}  "{s}"' for s in items)
    return f"[\n{body}\n{indent}]"


def _user(
    name: str,
    publish: Sequence[str],
    subscribe: Sequence[str],
    *,
    publish_deny: Sequence[str] = (),
    subscribe_deny: Sequence[str] = (),
    responses: bool = False,
) -> str:
    i = " " * 12
    pub = f"{i}allow: {_list(publish, i)}\n"
    if publish_deny:
        pub += f"{i}deny: {_list(publish_deny, i)}\n"
    sub = f"{i}allow: {_list(subscribe, i)}\n"
    if subscribe_deny:
        sub += f"{i}deny: {_list(subscribe_deny, i)}\n"
    extra = "          allow_responses: true\n" if responses else ""
    return (
        "      {\n"
        f"        user: {name}\n"
        f"        password: ${password_var(name)}\n"
        "        permissions: {\n"
        f"          publish: {{\n{pub}          }}\n"
        f"          subscribe: {{\n{sub}          }}\n"
        f"{extra}"
        "        }\n"
        "      }\n"
    )


HEADER = """\
# Generated by fedgate.nats_accounts.render_accounts: the FEDGATE account, one user per
# service and per edge, each limited to the subjects its role needs (allow lists: anything
# not listed is refused). Included by compose/nats/nats.conf and, as the same text, by the
# Kubernetes NATS cluster (deploy/k8s/nats.yaml). Passwords come from the environment.
# To add an edge, render again with its id and reload the servers (docs/deploy.md).
"""


def render_accounts(edge_ids: Sequence[str]) -> str:
    """The ``accounts.conf`` text for the trainer, the gateway and ``edge_ids``."""
    t_pub, t_pub_deny, t_sub, t_sub_deny = trainer_permissions()
    users = [
        _user("trainer", t_pub, t_sub, publish_deny=t_pub_deny, subscribe_deny=t_sub_deny),
        _user("gateway", *gateway_permissions()),
    ]
    for edge_id in edge_ids:
        publish, subscribe = edge_permissions(edge_id)
        users.append(_user(edge_id, publish, subscribe, responses=True))
    return (
        HEADER
        + f"accounts {{\n  {ACCOUNT} {{\n"
        + "    jetstream: enabled\n"
        + "    users: [\n"
        + "".join(users)
        + "    ]\n  }\n}\n"
    )
