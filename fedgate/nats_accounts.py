"""The NATS account of a deployment: one user per service and per edge, least privilege.

:func:`render_accounts` writes the ``accounts.conf`` that ``compose/nats/nats.conf`` and the
Kubernetes NATS cluster include. Every user gets an allow list (anything not listed is
refused); subjects, streams and buckets come from :mod:`fedcore` so they are spelled once.

- An edge publishes only its own heartbeat, leave and update subjects (updates: one
  subject per known model, so the stream's per-subject limit bounds its share), may store large
  updates in the updates object store, reads the round announcements, the signed model
  versions and the desired versions (rollouts), receives the feedback of its models (each
  model's broadcast and the labels addressed to itself, never another edge's) and the
  trainer's federated-evaluation requests and answers them (``allow_responses``). In secure
  rounds it reads only ``fedgate.secagg.<model>.to.<itself>`` and writes only
  ``...from.<itself>``: that is how the trainer knows which edge sent a secure-aggregation
  message.
- The gateway reads heartbeats, sends feedback requests and reads the rounds, round log,
  lineage and enrolled-edges buckets and the model versions' manifests; it owns the rollout buckets
  (rollout records, and the desired versions that edges read).
- The trainer manages JetStream and its buckets; it can neither speak for an edge (nor
  answer a secure-aggregation step in an edge's name) nor read the feedback labels (raw
  labels stay with the edges). It may answer requests it receives (``allow_responses``):
  the edges' paced masked-input parts wait for its acknowledgement.

Every user subscribes only to its own inbox prefix ``_INBOX_<user>.>`` (services connect
with ``inbox_prefix``): replies and JetStream deliveries to the trainer are not readable by
an edge. Nobody but the trainer may delete a consumer: the watches and downloads of edges
and the gateway create ephemeral consumers that the server removes once unused (KV watches
set an inactive threshold).

Passwords are ``$NATS_PASSWORD_<USER>`` references resolved from the server's environment;
users are named by their client certificate's subject (:func:`certificate_user`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedcore import subjects, transport
from fedcore.artifact_store import MODELS_BUCKET
from fedcore.edge_id import check_edge_id
from fedcore.fed_eval import EVAL_PREFIX
from fedcore.models import REGISTRY as MODELS
from fedcore.subjects import FEEDBACK_PREFIX
from fedcore.transport import EDGES_BUCKET
from fedcore.wire import (
    DESIRED_BUCKET,
    LINEAGE_BUCKET,
    ROLLOUTS_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
)
from fedgate.tls_cmd import ORG

ACCOUNT = "FEDGATE"
STREAM_NAMES = "$JS.API.STREAM.NAMES"
"""nats.py looks a stream up by subject before a watch or an object download (names only)."""


CERT_ORG = ORG
"""The organisation of the client certificates ``fedgate keys tls`` issues."""


def certificate_user(user: str) -> str:
    """The NATS user name of ``user`` where users are mapped from client certificates
    (``verify_and_map``): the certificate's subject as nats-server spells it. The server
    picks the user from the certificate and then checks that user's password, so one
    client's certificate with another's password is refused."""
    return f"CN={user},O={CERT_ORG}"


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
        *(transport.update_subject(model, edge_id) for model in sorted(MODELS)),
        *_updates_object_put(),
        STREAM_NAMES,
        *_read_stream(f"KV_{ROUNDS_BUCKET}"),
        *_read_stream(f"OBJ_{MODELS_BUCKET}"),
        *_read_stream(f"KV_{DESIRED_BUCKET}"),
        subjects.secagg_from_edge("*", edge_id),
    ]
    own = subjects.inbox_all(edge_id)
    # feedback: a model's broadcast, and the labels the gateway addresses to this edge alone
    feedback = [
        subject
        for model in sorted(MODELS)
        for subject in (subjects.feedback(model), subjects.feedback_to_edge(model, edge_id))
    ]
    subscribe = [own, *feedback, f"{EVAL_PREFIX}.*"]
    return publish, [*subscribe, subjects.secagg_to_edge("*", edge_id)]


def gateway_permissions() -> tuple[list[str], list[str]]:
    publish = [f"{FEEDBACK_PREFIX}.*", STREAM_NAMES]
    # history and rounds API; the enrolled edges (the registry mirror) it routes to
    for bucket in (ROUNDS_BUCKET, ROUND_LOG_BUCKET, LINEAGE_BUCKET, EDGES_BUCKET):
        publish += _read_stream(f"KV_{bucket}")
    publish += _read_stream(f"OBJ_{MODELS_BUCKET}")  # a rollout's version must be there
    for bucket in (ROLLOUTS_BUCKET, DESIRED_BUCKET):  # rollouts: the gateway owns these two
        publish += [
            f"$JS.API.STREAM.CREATE.KV_{bucket}",
            f"$JS.API.STREAM.UPDATE.KV_{bucket}",  # scaled up to nats_replicas (fedcore.replicas)
            *_read_stream(f"KV_{bucket}"),
            f"$KV.{bucket}.>",
        ]
    return publish, [subjects.inbox_all("gateway"), subjects.HEARTBEAT_ALL, subjects.LEAVE_ALL]


def trainer_permissions() -> tuple[list[str], list[str], list[str], list[str]]:
    """(publish allow, publish deny, subscribe allow, subscribe deny) of the trainer."""
    buckets = ["$KV.>", "$O.>"]  # the trainer owns every bucket
    publish = ["$JS.API.>", f"$JS.ACK.{transport.UPDATES_STREAM}.>", "$JS.FC.>", *buckets]
    publish += ["fedgate.>"]
    speaks_for_edges = [
        f"{subjects.HEARTBEAT_PREFIX}.>",
        f"{subjects.LEAVE_PREFIX}.>",
        f"{transport.UPDATES_PREFIX}.>",
        f"{FEEDBACK_PREFIX}.>",
        subjects.secagg_from_edge("*", "*"),
    ]
    subscribe = [subjects.inbox_all("trainer"), "fedgate.>", *buckets]
    return publish, speaks_for_edges, subscribe, [f"{FEEDBACK_PREFIX}.>"]


@dataclass(frozen=True)
class Permissions:
    """One NATS user's allow lists (anything not listed is refused) and deny lists (deny
    wins); ``responses``: may answer requests sent to subjects it subscribes to."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    responses: bool = False

    def render(self, indent: str) -> str:
        """The ``permissions: {...}`` block, its key at ``indent``."""
        inner, lists = indent + "  ", indent + "    "
        pub = f"{lists}allow: {_list(self.publish, lists)}\n"
        if self.publish_deny:
            pub += f"{lists}deny: {_list(self.publish_deny, lists)}\n"
        sub = f"{lists}allow: {_list(self.subscribe, lists)}\n"
        if self.subscribe_deny:
            sub += f"{lists}deny: {_list(self.subscribe_deny, lists)}\n"
        extra = f"{inner}allow_responses: true\n" if self.responses else ""
        return (
            f"{indent}permissions: {{\n"
            f"{inner}publish: {{\n{pub}{inner}}}\n"
            f"{inner}subscribe: {{\n{sub}{inner}}}\n"
            f"{extra}"
            f"{indent}}}\n"
        )


def role_permissions(user: str) -> Permissions:
    """The permissions of ``user``: ``trainer``, ``gateway``, or an edge id (any other name).

    The one source of the rules: the compose and Kubernetes ``accounts.conf``
    (:func:`render_accounts`) and the local stack's ``nats.conf``
    (:func:`fedgate.natsconf.render_nats_config`) are rendered from it.
    """
    if user == "trainer":
        t_pub, t_pub_deny, t_sub, t_sub_deny = trainer_permissions()
        # responses: it acknowledges an edge's paced masked-input parts (fedcore.secagg.parts)
        return Permissions(
            tuple(t_pub), tuple(t_sub), tuple(t_pub_deny), tuple(t_sub_deny), responses=True
        )
    if user == "gateway":
        g_pub, g_sub = gateway_permissions()
        return Permissions(tuple(g_pub), tuple(g_sub))
    e_pub, e_sub = edge_permissions(user)
    return Permissions(tuple(e_pub), tuple(e_sub), responses=True)


def _list(items: Sequence[str], indent: str) -> str:
    body = ",\n".join(f'{indent}  "{s}"' for s in items)
    return f"[\n{body}\n{indent}]"


def _user(name: str, permissions: Permissions) -> str:
    return (
        "      {\n"
        f'        user: "{certificate_user(name)}"\n'
        f"        password: ${password_var(name)}\n"
        f"{permissions.render(' ' * 8)}"
        "      }\n"
    )


HEADER = """\
# Generated by fedgate.nats_accounts.render_accounts: the FEDGATE account, one user per
# service and per edge, each limited to the subjects its role needs (allow lists: anything
# not listed is refused). Included by compose/nats/nats.conf and, as the same text, by the
# Kubernetes NATS cluster (deploy/k8s/nats.yaml). Users are named by the subject of their
# client certificate (tls verify_and_map): the certificate picks the user, then that user's
# password is checked. Each user reads only its own inbox prefix (_INBOX_<user>).
# Passwords come from the environment.
# To add an edge, render again with its id and reload the servers (docs/deploy.md).
"""


def render_accounts(edge_ids: Sequence[str]) -> str:
    """The ``accounts.conf`` text for the trainer, the gateway and ``edge_ids``."""
    users = [_user(name, role_permissions(name)) for name in ["trainer", "gateway", *edge_ids]]
    return (
        HEADER
        + f"accounts {{\n  {ACCOUNT} {{\n"
        + "    jetstream: enabled\n"
        + "    users: [\n"
        + "".join(users)
        + "    ]\n  }\n}\n"
    )
