"""Least privilege on the local stack's NATS: the nats-server ``fedgate up`` starts.

The server is started by the launcher itself (:meth:`fedgate.launcher.Stack._start_nats`:
the same config file, users, passwords and per-role permissions as ``fedgate up``), then
each service connects as its own user and tries what its role must not do:

- an edge cannot publish as another edge (heartbeat, leave, update);
- an edge cannot read other edges' updates (subscription, consumer, direct get);
- an edge cannot write model artifacts, round announcements or desired versions;
- the gateway and the trainer cannot speak for edges; the trainer cannot read labels;
- an edge cannot read another user's inbox (the trainer's pull deliveries), every client
  connect uses its own inbox prefix;
- only the trainer deletes consumers; the edges' watches and downloads clean up.

``tests/test_deploy_nats.py`` runs the compose variant (same rules, :mod:`fedgate.nats_accounts`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from edge_runtime.publisher import UpdatePublisher
from fedcore import subjects
from fedcore.artifact_store import MODELS_BUCKET
from fedcore.compression import CompressionSettings, encode_update
from fedcore.envelope import read_header_unverified, seal_update
from fedcore.keys import load_ed25519, x25519_public_from_hex
from fedcore.transport import (
    UPDATES_OBJECT_BUCKET,
    UPDATES_STREAM,
    StreamSpec,
    update_subject,
    updates_filter,
)
from fedcore.wire import (
    DESIRED_BUCKET,
    ROLLOUTS_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
    RoundRecord,
    round_key,
)
from fedgate.keys_cmd import KeyLayout, init_keys
from fedgate.launcher import Stack, StackConfig
from fedgate.nats_accounts import role_permissions
from gateway.rollout_machine import RolloutSpec, desired_of, new_rollout, rolled_back
from gateway.rollout_store import RolloutStore
from tests.conftest import SignedArtifacts, processes_mentioning
from trainer.bus import ensure_object_bucket, ensure_updates_stream
from trainer.driver import RoundDriver
from trainer.rounds import RoundBook, RoundPolicy
from trainer.serving_watch import ServingWatch
from trainer.strategies import get_strategy

EDGES = ["edge-1", "edge-2"]


@dataclass
class LocalNats:
    stack: Stack
    keys: KeyLayout
    errors: dict[str, list[str]] = field(default_factory=dict)

    def password(self, user: str) -> str:
        return (self.stack.config.data_dir / "secrets" / f"nats-{user}.pass").read_text().strip()

    async def connect(self, user: str) -> NATS:
        errors = self.errors.setdefault(user, [])

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        return await nats.connect(
            servers=[self.stack.nats_url],
            user=user,
            password=self.password(user),
            inbox_prefix=subjects.inbox_prefix(user),
            connect_timeout=3,
            allow_reconnect=False,
            error_cb=on_error,
        )

    async def violation(self, nc: NATS, user: str, needle: str) -> None:
        """Wait (3 s at most) for a permissions error sent to ``user`` naming ``needle``."""
        await nc.flush(timeout=3)
        deadline = asyncio.get_running_loop().time() + 3.0
        while asyncio.get_running_loop().time() < deadline:
            found = [e.lower() for e in self.errors.get(user, []) if "ermissions" in e]
            if any(needle.lower() in e for e in found):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation naming {needle!r}: {self.errors}")

    async def no_violation(self, nc: NATS, user: str) -> None:
        await nc.flush(timeout=3)
        await asyncio.sleep(0.1)
        assert [e for e in self.errors.get(user, []) if "ermissions" in e] == []


@pytest.fixture(scope="module")
def local_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNats]:
    data_dir = tmp_path_factory.mktemp("local-nats")
    stack = Stack(StackConfig(data_dir=data_dir, edges=len(EDGES)))
    try:
        stack._start_nats()  # exactly as `fedgate up` starts it
        yield LocalNats(stack, init_keys(data_dir / "keys", EDGES))
    finally:
        stack.stop()
    assert processes_mentioning(str(data_dir)) == []


@pytest.fixture
async def conns(local_nats: LocalNats) -> AsyncIterator[dict[str, NATS]]:
    local_nats.errors.clear()
    out = {u: await local_nats.connect(u) for u in ["trainer", "gateway", *EDGES]}
    js = out["trainer"].jetstream()
    await ensure_updates_stream(js, StreamSpec())  # as the trainer creates them
    await ensure_object_bucket(js, StreamSpec())
    try:
        yield out
    finally:
        for nc in out.values():
            await nc.close()


async def delivered(nc: NATS, subject: str, sub: Subscription) -> Msg:
    """Publish on ``subject`` until ``sub`` gets it (5 s at most). Core NATS is at most
    once: measured here, about 1 in 50 messages sent right after a fresh subscription is
    flushed never arrives, with or without permissions."""
    for _ in range(10):
        await nc.publish(subject, b"mine")
        await nc.flush()
        with contextlib.suppress(nats.errors.TimeoutError):
            return await sub.next_msg(timeout=0.5)
    raise AssertionError(f"{subject} never arrived")


def sealed(local_nats: LocalNats, edge: str, payload_floats: int = 16) -> tuple[bytes, bytes]:
    """(plain update payload, sealed envelope) of ``edge`` for round 1 of digits."""
    delta = np.arange(payload_floats, dtype=np.float32)
    payload = encode_update(delta, [payload_floats], CompressionSettings(mode="none")).data
    _, envelope = seal_update(
        payload,
        recipient=x25519_public_from_hex(local_nats.keys.hpke_pub.read_text()),
        signer=load_ed25519(local_nats.keys.edge_key(edge)),
        model="digits",
        round=1,
        edge_id=edge,
        base_version=1,
        base_digest="0" * 64,
        num_samples=10,
    )
    return bytes(payload), bytes(envelope)


def test_the_launcher_renders_every_user_with_its_role(local_nats: LocalNats) -> None:
    conf = local_nats.stack.config.data_dir / "nats" / "nats.conf"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600  # it holds the passwords
    text = conf.read_text()
    for user in ["trainer", "gateway", *EDGES]:
        assert role_permissions(user).render(" " * 6) in text, user
    assert text.count("permissions: {") == 2 + len(EDGES)
    assert "sync_interval: always" in text


async def test_a_wrong_password_or_unknown_user_is_refused(local_nats: LocalNats) -> None:
    for user, password in [("edge-1", "wrong"), ("edge-9", "x"), ("admin", "")]:
        with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
            nc = await nats.connect(
                local_nats.stack.nats_url,
                user=user,
                password=password,
                connect_timeout=3,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
            await nc.close()


async def test_an_edge_cannot_publish_as_another_edge(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    beats = await conns["gateway"].subscribe(subjects.HEARTBEAT_ALL)
    leaves = await conns["gateway"].subscribe(subjects.LEAVE_ALL)
    await conns["gateway"].flush()
    got = await delivered(conns["edge-1"], subjects.heartbeat("edge-1"), beats)
    assert got.subject == subjects.heartbeat("edge-1")
    await local_nats.no_violation(conns["edge-1"], "edge-1")

    await conns["edge-1"].publish(subjects.heartbeat("edge-2"), b"forged")
    await conns["edge-1"].publish(subjects.leave("edge-2"), b"")
    await local_nats.violation(conns["edge-1"], "edge-1", subjects.heartbeat("edge-2"))
    await local_nats.violation(conns["edge-1"], "edge-1", subjects.leave("edge-2"))
    for sub in (beats, leaves):
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.3)

    # an update sealed and signed by edge-1 but published on edge-2's subject: no ack
    _, envelope = sealed(local_nats, "edge-1")
    js = conns["edge-1"].jetstream()
    with pytest.raises(nats.errors.Error):
        await js.publish(update_subject("digits", "edge-2"), envelope, timeout=0.5)
    await local_nats.violation(
        conns["edge-1"], "edge-1", 'publish to "fedgate.updates.digits.edge-2'
    )
    ack = await js.publish(update_subject("digits", "edge-1"), envelope, stream=UPDATES_STREAM)
    assert ack.stream == UPDATES_STREAM

    # the trainer sees edge-1's own update only
    trainer_js = conns["trainer"].jetstream()
    probe = await trainer_js.pull_subscribe(
        updates_filter(), durable="probe-a", stream=UPDATES_STREAM
    )
    try:
        subjects_seen = [m.subject for m in await probe.fetch(10, timeout=1)]
    except nats.errors.TimeoutError:
        subjects_seen = []
    assert update_subject("digits", "edge-2") not in subjects_seen
    assert update_subject("digits", "edge-1") in subjects_seen
    await trainer_js.delete_consumer(UPDATES_STREAM, "probe-a")


async def test_an_edge_cannot_read_other_edges_updates(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    _, envelope = sealed(local_nats, "edge-2")
    ack = (
        await conns["edge-2"]
        .jetstream()
        .publish(update_subject("digits", "edge-2"), envelope, stream=UPDATES_STREAM)
    )
    spy, user = conns["edge-1"], "edge-1"
    await spy.subscribe(updates_filter())
    await local_nats.violation(spy, user, 'subscription to "fedgate.updates.>')
    await spy.subscribe(">")
    await local_nats.violation(spy, user, 'subscription to ">"')
    weak = spy.jetstream(timeout=0.5)
    with pytest.raises(nats.errors.Error):  # no consumer on the updates stream
        await weak.pull_subscribe(updates_filter(), durable="spy", stream=UPDATES_STREAM)
    await local_nats.violation(spy, user, f"$JS.API.CONSUMER.INFO.{UPDATES_STREAM}")
    with pytest.raises(nats.errors.Error):
        await weak.add_consumer(UPDATES_STREAM, durable_name="spy")
    await local_nats.violation(spy, user, f"$JS.API.CONSUMER.DURABLE.CREATE.{UPDATES_STREAM}")
    with pytest.raises(nats.errors.Error):  # an ephemeral one neither
        await weak.add_consumer(UPDATES_STREAM)
    await local_nats.violation(spy, user, f'"$JS.API.CONSUMER.CREATE.{UPDATES_STREAM}"')
    with pytest.raises(nats.errors.Error):  # no reading by sequence number either
        await weak.get_msg(UPDATES_STREAM, seq=ack.seq)
    await local_nats.violation(spy, user, f"$JS.API.STREAM.MSG.GET.{UPDATES_STREAM}")
    with pytest.raises(nats.errors.Error):
        await weak.get_msg(UPDATES_STREAM, seq=ack.seq, direct=True)
    await local_nats.violation(spy, user, f"$JS.API.DIRECT.GET.{UPDATES_STREAM}")
    with pytest.raises(nats.errors.Error):  # nor manage the stream
        await weak.purge_stream(UPDATES_STREAM)
    await local_nats.violation(spy, user, f"$JS.API.STREAM.PURGE.{UPDATES_STREAM}")


async def test_large_updates_in_the_shared_object_store_are_ciphertext_to_other_edges(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    """A known limit (SECURITY.md): the object store for large updates is one bucket, and
    nats.py reads an object's info through the stream's generic get API, so an edge that
    may put objects can also fetch other edges' chunks. What it gets is sealed to the
    trainer's HPKE key: the plain update is nowhere in it."""
    plain, envelope = sealed(local_nats, "edge-2", payload_floats=4096)
    publisher = UpdatePublisher(conns["edge-2"].jetstream(), max_payload=4096)
    published = await publisher.publish(envelope)
    assert published.via_object
    stream = f"OBJ_{UPDATES_OBJECT_BUCKET}"
    chunks = b""
    for seq in range(1, 64):
        try:
            msg = await conns["edge-1"].jetstream(timeout=1).get_msg(stream, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        if msg.subject and msg.subject.startswith(f"$O.{UPDATES_OBJECT_BUCKET}.C."):
            chunks += msg.data or b""
    assert envelope in chunks or chunks in envelope, "the chunks are the sealed envelope"
    assert read_header_unverified(envelope).edge_id == "edge-2"
    assert plain[:64] not in chunks and plain[-64:] not in chunks


async def test_an_edge_cannot_write_models_rounds_or_desired_versions(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    trainer_js = conns["trainer"].jetstream()
    models = await trainer_js.create_object_store(MODELS_BUCKET)
    rounds = await trainer_js.create_key_value(bucket=ROUNDS_BUCKET)
    desired = await conns["gateway"].jetstream().create_key_value(bucket=DESIRED_BUCKET)
    try:
        await models.put("digits/2/model.onnx", b"signed model bytes")
        await rounds.put("digits", b"round 1")
        await desired.put("digits", b"v2")
        edge = conns["edge-1"].jetstream(timeout=2)
        # what an edge needs: read them
        assert (await (await edge.object_store(MODELS_BUCKET)).get("digits/2/model.onnx")).data
        assert (await (await edge.key_value(ROUNDS_BUCKET)).get("digits")).value == b"round 1"
        assert (await (await edge.key_value(DESIRED_BUCKET)).get("digits")).value == b"v2"
        await local_nats.no_violation(conns["edge-1"], "edge-1")

        weak = conns["edge-1"].jetstream(timeout=0.5)
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await (await weak.object_store(MODELS_BUCKET)).put("digits/2/model.onnx", b"evil")
        await local_nats.violation(conns["edge-1"], "edge-1", 'publish to "$o.fedgate_models')
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await (await weak.object_store(MODELS_BUCKET)).delete("digits/2/model.onnx")
        with pytest.raises(nats.errors.Error):
            await (await weak.key_value(ROUNDS_BUCKET)).put("digits", b"forged round")
        await local_nats.violation(conns["edge-1"], "edge-1", 'publish to "$kv.fedgate_rounds')
        with pytest.raises(nats.errors.Error):
            await (await weak.key_value(DESIRED_BUCKET)).put("digits", b"v666")
        await local_nats.violation(conns["edge-1"], "edge-1", 'publish to "$kv.fedgate_desired')
        with pytest.raises(nats.errors.Error):
            await weak.delete_stream(f"OBJ_{MODELS_BUCKET}")
        with pytest.raises(nats.errors.Error):  # the gateway reads models, never writes
            await (await conns["gateway"].jetstream(timeout=0.5).object_store(MODELS_BUCKET)).put(
                "digits/3/model.onnx", b"evil"
            )
        got = await models.get("digits/2/model.onnx")
        assert got.data == b"signed model bytes"
        assert (await rounds.get("digits")).value == b"round 1"
        assert (await desired.get("digits")).value == b"v2"
    finally:
        await trainer_js.delete_object_store(MODELS_BUCKET)
        await trainer_js.delete_key_value(ROUNDS_BUCKET)
        await trainer_js.delete_key_value(DESIRED_BUCKET)


async def test_gateway_and_trainer_cannot_speak_for_edges_nor_the_trainer_read_labels(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    _, envelope = sealed(local_nats, "edge-1")
    for user in ["gateway", "trainer"]:
        await conns[user].publish(subjects.heartbeat("edge-1"), b"forged")
        await local_nats.violation(conns[user], user, subjects.heartbeat("edge-1"))
        await conns[user].publish(update_subject("digits", "edge-1"), envelope)
        await local_nats.violation(conns[user], user, 'publish to "fedgate.updates.digits.edge-1')
    await conns["trainer"].subscribe(subjects.feedback("digits"))
    await local_nats.violation(conns["trainer"], "trainer", 'subscription to "fedgate.feedback')

    # feedback labels travel gateway -> edge only
    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok")

    await conns["edge-2"].subscribe(subjects.feedback("digits"), cb=answer)
    # and to one edge, on a subject the same permissions cover (a token's edge)
    await conns["edge-2"].subscribe(subjects.feedback_to_edge("digits", "edge-2"), cb=answer)
    await conns["edge-2"].flush()
    for subject in (subjects.feedback("digits"), subjects.feedback_to_edge("digits", "edge-2")):
        reply = None
        for _ in range(5):  # core NATS is at most once: a fresh subscription may miss one
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                reply = await conns["gateway"].request(subject, b"label", timeout=1)
                break
        assert reply is not None and reply.data == b"ok"
    await conns["edge-1"].publish(subjects.feedback("digits"), json.dumps({}).encode())
    await local_nats.violation(conns["edge-1"], "edge-1", 'publish to "fedgate.feedback.digits')


async def test_secure_aggregation_subjects_are_per_edge(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    """Only the trainer writes an edge's ``...to.<edge>``, only that edge reads it; only
    the edge writes ``...from.<edge>``: the trainer knows who sent a masked input."""
    own_to = subjects.secagg_to_edge("digits", "edge-1")
    own_from = subjects.secagg_from_edge("digits", "edge-1")
    inbox = await conns["edge-1"].subscribe(own_to)
    answers = await conns["trainer"].subscribe(subjects.SECAGG_FROM_ALL)
    await conns["edge-1"].flush()
    await conns["trainer"].flush()
    assert (await delivered(conns["trainer"], own_to, inbox)).subject == own_to
    assert (await delivered(conns["edge-1"], own_from, answers)).subject == own_from
    await local_nats.no_violation(conns["edge-1"], "edge-1")
    await local_nats.no_violation(conns["trainer"], "trainer")

    spy = conns["edge-1"]
    await spy.subscribe(subjects.secagg_to_edge("digits", "edge-2"))
    await local_nats.violation(spy, "edge-1", 'subscription to "fedgate.secagg.digits.to.edge-2')
    await spy.subscribe(subjects.SECAGG_FROM_ALL)
    await local_nats.violation(spy, "edge-1", 'subscription to "fedgate.secagg.*.from.*')
    await spy.publish(subjects.secagg_from_edge("digits", "edge-2"), b"forged masked input")
    await local_nats.violation(spy, "edge-1", 'publish to "fedgate.secagg.digits.from.edge-2')
    await spy.publish(subjects.secagg_to_edge("digits", "edge-2"), b"forged request")
    await local_nats.violation(spy, "edge-1", 'publish to "fedgate.secagg.digits.to.edge-2')
    await conns["trainer"].publish(subjects.secagg_from_edge("digits", "edge-2"), b"forged")
    await local_nats.violation(
        conns["trainer"], "trainer", 'publish to "fedgate.secagg.digits.from.edge-2'
    )
    with pytest.raises(nats.errors.TimeoutError):  # none of the forgeries arrived
        await answers.next_msg(timeout=0.3)


async def test_an_edge_cannot_read_the_trainers_inbox(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    """Each user subscribes only to its own inbox prefix (#16 finding 6): on the old
    permissions every role could subscribe to ``_INBOX.>`` and so read the trainer's pull
    deliveries, other edges' update headers and chunks."""
    spy = conns["edge-1"]
    leaked: list[Msg] = []

    async def keep(msg: Msg) -> None:
        leaked.append(msg)

    for inbox in ("_INBOX.>", subjects.inbox_all("trainer"), ">"):
        await spy.subscribe(inbox, cb=keep)
        await local_nats.violation(spy, "edge-1", f'subscription to "{inbox}"')
    _, envelope = sealed(local_nats, "edge-2")
    await (
        conns["edge-2"]
        .jetstream()
        .publish(update_subject("digits", "edge-2"), envelope, stream=UPDATES_STREAM)
    )
    trainer_js = conns["trainer"].jetstream()
    pull = await trainer_js.pull_subscribe(
        updates_filter(), durable="probe-inbox", stream=UPDATES_STREAM
    )
    try:
        got = await pull.fetch(10, timeout=2)
        assert any(m.subject == update_subject("digits", "edge-2") for m in got)
        assert all(m.reply.startswith("$JS.ACK.") for m in got)
        await asyncio.sleep(0.3)
        assert leaked == []  # the delivery went to _INBOX_trainer..., unreadable by edge-1
    finally:
        await trainer_js.delete_consumer(UPDATES_STREAM, "probe-inbox")
    # its own inbox works: JetStream requests of edge-1 are answered on _INBOX_edge-1
    assert spy.new_inbox().startswith("_INBOX_edge-1.")
    ack = await spy.jetstream(timeout=2).publish(update_subject("digits", "edge-1"), envelope)
    assert ack.stream == UPDATES_STREAM


async def test_only_the_trainer_deletes_consumers_and_watches_clean_up(
    local_nats: LocalNats, conns: dict[str, NATS]
) -> None:
    """Edges and the gateway may not delete consumers (#16 finding 6): on the old
    permissions edge-1 could delete the gateway's watch of the rounds bucket. Their own
    watches and downloads still work and leave no consumer behind for long: KV watches set
    an inactive threshold, and the server removes an unused ephemeral consumer."""
    trainer_js = conns["trainer"].jetstream()
    rounds = await trainer_js.create_key_value(bucket=ROUNDS_BUCKET)
    models = await trainer_js.create_object_store(MODELS_BUCKET)
    stream = f"KV_{ROUNDS_BUCKET}"
    try:
        await rounds.put("digits", b"round 1")
        await models.put("digits/2/model.onnx", b"m" * 300_000)
        gateway_kv = await conns["gateway"].jetstream(timeout=2).key_value(ROUNDS_BUCKET)
        watch = await gateway_kv.watchall()
        assert (await watch.updates(timeout=2)) is not None
        names = [c.name for c in await trainer_js.consumers_info(stream)]
        assert len(names) == 1
        for user in ("edge-1", "gateway"):
            weak = conns[user].jetstream(timeout=0.5)
            with pytest.raises(nats.errors.Error):
                await weak.delete_consumer(stream, names[0])
            await local_nats.violation(conns[user], user, f"$JS.API.CONSUMER.DELETE.{stream}")
        assert [c.name for c in await trainer_js.consumers_info(stream)] == names
        await rounds.put("digits", b"round 2")
        entry = await watch.updates(timeout=2)
        while entry is None:  # the marker that the initial values are all there
            entry = await watch.updates(timeout=2)
        assert entry.value == b"round 2"  # the watch still runs
        await watch.stop()

        local_nats.errors.clear()
        edge = conns["edge-1"].jetstream(timeout=2)
        edge_watch = await (await edge.key_value(ROUNDS_BUCKET)).watchall()
        assert (await edge_watch.updates(timeout=2)) is not None
        infos = await trainer_js.consumers_info(stream)
        assert all(0 < (c.config.inactive_threshold or 0) <= 300 for c in infos), infos
        await edge_watch.stop()
        store = await edge.object_store(MODELS_BUCKET)
        assert (await store.get("digits/2/model.onnx")).data == b"m" * 300_000
        await local_nats.no_violation(conns["edge-1"], "edge-1")
        deadline = asyncio.get_running_loop().time() + 30
        while await trainer_js.consumers_info(f"OBJ_{MODELS_BUCKET}"):
            assert asyncio.get_running_loop().time() < deadline, "download consumer stayed"
            await asyncio.sleep(0.5)
    finally:
        await trainer_js.delete_key_value(ROUNDS_BUCKET)
        await trainer_js.delete_object_store(MODELS_BUCKET)


def test_every_client_connect_uses_its_own_inbox_prefix() -> None:
    """Every ``nats.connect`` of the services and tools passes ``inbox_prefix``: without
    it nats.py uses ``_INBOX``, which no role may subscribe to any more."""
    root = Path(__file__).resolve().parent.parent
    calls = []
    for package in ("gateway", "trainer", "edge_runtime", "fedcore", "fedgate"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "connect"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "nats"
                ):
                    keywords = {k.arg for k in node.keywords}
                    calls.append((f"{path.relative_to(root)}:{node.lineno}", keywords))
    # the services connect through fedcore.nats_client.connect_service (one call)
    assert any(where.startswith("fedcore/nats_client.py") for where, _ in calls), calls
    assert [where for where, kw in calls if "inbox_prefix" not in kw] == []
    for service in ("gateway/app.py", "trainer/service.py", "edge_runtime/service.py"):
        assert "connect_service(" in (root / service).read_text(), service


async def test_the_trainer_follows_the_desired_versions_with_its_own_permissions(
    local_nats: LocalNats, conns: dict[str, NATS], signed_v1: SignedArtifacts, tmp_path: Path
) -> None:
    """The trainer reads what the gateway writes (a rolled-back rollout and the desired
    versions), watches it, and records the round it abandons, all within the trainer's
    permissions (trainer/serving_watch.py)."""
    gateway_js = conns["gateway"].jetstream()
    store = await RolloutStore.open(gateway_js)
    now = time.time()
    r = rolled_back(new_rollout("digits", 1, RolloutSpec(version=2), "trainer", now), now, "gate")
    await store.replace(r, None)
    settled = desired_of(r, now, 0.0)
    assert settled is not None
    await store.put_desired(settled)
    trainer_js = conns["trainer"].jetstream()
    book = RoundBook(
        "digits",
        RoundPolicy(),
        get_strategy("fedavg"),
        version=2,
        digest="22" * 32,
        params=np.zeros_like(signed_v1.params),
    )
    book.open([], now=now)
    driver = RoundDriver({"digits": book}, tmp_path, {"digits": (signed_v1.params.size,)})
    trusted = load_ed25519(signed_v1.private_key).public_key()
    watch = ServingWatch(trainer_js, driver, signed_v1.artifacts, trusted, retry_s=0.2)
    stop = asyncio.Event()
    try:
        await watch.start()  # read, rebased on version 1, round 1 recorded as abandoned
        assert (book.version, book.newest, book.current) == (1, 2, None)
        log = await trainer_js.key_value(ROUND_LOG_BUCKET)
        record = RoundRecord.decode((await log.get(round_key("digits", 1))).value or b"")
        assert record.outcome == "failed" and r.id in record.reason
        task = asyncio.create_task(watch.run(stop))
        later = settled.model_copy(update={"candidate": 3, "rollout": "r-000000000003"})
        await store.put_desired(later)
        for _ in range(50):
            if watch.latest["digits"].candidate == 3:
                break
            await asyncio.sleep(0.1)
        assert watch.latest["digits"].candidate == 3  # watched, not only read at start
        stop.set()
        await asyncio.wait_for(task, 5)
        await local_nats.no_violation(conns["trainer"], "trainer")
    finally:
        stop.set()
        for bucket in (DESIRED_BUCKET, ROLLOUTS_BUCKET, ROUNDS_BUCKET, ROUND_LOG_BUCKET):
            with contextlib.suppress(Exception):
                await trainer_js.delete_key_value(bucket)
