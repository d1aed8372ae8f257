"""The compose NATS configuration, run by a real nats-server: mTLS and per-role permissions.

``compose/nats/nats.conf`` and ``accounts.conf`` are used as they are, except for the
container paths and listen addresses, which point into a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from fedcore import subjects
from fedcore.artifact_store import MODELS_BUCKET
from fedcore.kv import kv_keys
from fedcore.process import ManagedProcess, free_port
from fedcore.transport import UPDATES_OBJECT_BUCKET, UPDATES_STREAM, update_subject, updates_filter
from fedcore.wire import ROUND_LOG_BUCKET, ROUNDS_BUCKET
from fedgate.nats_accounts import edge_permissions, render_accounts
from fedgate.tls_cmd import TlsPlan, create_tls
from tests.deploy_support import COMPOSE_DIR, USERS, nats_binary, password_var

NATS_DIR = COMPOSE_DIR / "nats"


def localise(conf_dir: Path, tls_dir: Path, port: int, monitor: int) -> Path:
    """Copy the compose NATS config into ``conf_dir`` with local paths and ports."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(NATS_DIR / "accounts.conf", conf_dir / "accounts.conf")
    text = (NATS_DIR / "nats.conf").read_text()
    for old, new in [
        ("/etc/nats-tls/", f"{tls_dir}/"),
        ("/data/jetstream", str(conf_dir / "jetstream")),
        ("0.0.0.0:4222", f"127.0.0.1:{port}"),
        ("0.0.0.0:8222", f"127.0.0.1:{monitor}"),
    ]:
        assert old in text, f"nats.conf no longer contains {old!r}"
        text = text.replace(old, new)
    (conf_dir / "nats.conf").write_text(text)
    return conf_dir / "nats.conf"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    create_tls(TlsPlan(d, ("edge-1", "edge-2")))
    return d


@dataclass
class ComposeNats:
    url: str
    tls_dir: Path
    passwords: dict[str, str]
    errors: dict[str, list[str]] = field(default_factory=dict)

    def context(self, user: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        ctx.load_cert_chain(self.tls_dir / f"{user}.crt", self.tls_dir / f"{user}.key")
        return ctx

    async def connect(self, user: str) -> NATS:
        errors = self.errors.setdefault(user, [])

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        return await nats.connect(
            servers=[self.url],
            user=user,
            password=self.passwords[user],
            tls=self.context(user),
            inbox_prefix=subjects.inbox_prefix(user),
            connect_timeout=3,
            allow_reconnect=False,
            error_cb=on_error,
        )

    async def violation(self, nc: NATS, user: str, needle: str) -> None:
        """Wait (3 s at most) for a permission error sent to ``user`` that names ``needle``."""
        await nc.flush(timeout=3)
        deadline = asyncio.get_running_loop().time() + 3.0
        while asyncio.get_running_loop().time() < deadline:
            errors = [e.lower() for e in self.errors.get(user, []) if "ermissions" in e]
            if any(needle.lower() in e for e in errors):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation naming {needle!r}: {self.errors}")

    async def violations(self, nc: NATS, user: str, *, expect: bool = True) -> list[str]:
        """Permission errors the server sent ``user``; waits up to 3 s for one when expected."""
        await nc.flush(timeout=3)
        deadline = asyncio.get_running_loop().time() + (3.0 if expect else 0.2)
        while True:
            found = [e for e in self.errors.get(user, []) if "ermissions" in e]
            if (expect and found) or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def compose_nats(tmp_path_factory: pytest.TempPathFactory, tls_dir: Path) -> Iterator[ComposeNats]:
    root = tmp_path_factory.mktemp("nats")
    port, monitor = free_port(), free_port()
    conf = localise(root / "conf", tls_dir, port, monitor)
    # as docs/deploy.md makes them: nats-server reads a $VAR value as a config token, so a
    # token_urlsafe password such as "12-Rk..." was a malformed date and the server refused
    # the config (test_passwords_must_start_with_a_letter)
    passwords = {u: "fg" + secrets.token_hex(16) for u in USERS}
    env = dict(os.environ) | {password_var(u): p for u, p in passwords.items()}
    proc = ManagedProcess(
        "nats-server", [nats_binary(), "-c", str(conf)], log_path=root / "nats.log", env=env
    )
    proc.start()
    try:

        def healthy() -> bool:
            url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status) == 200

        proc.wait_ready(healthy, timeout=30)
        yield ComposeNats(f"nats://127.0.0.1:{port}", tls_dir, passwords)
    finally:
        proc.stop()


@pytest.fixture
async def clients(compose_nats: ComposeNats) -> AsyncIterator[dict[str, NATS]]:
    compose_nats.errors.clear()
    conns = {u: await compose_nats.connect(u) for u in USERS}
    try:
        yield conns
    finally:
        for nc in conns.values():
            await nc.close()


def test_the_config_refuses_to_start_without_a_password(tmp_path: Path, tls_dir: Path) -> None:
    conf = localise(tmp_path, tls_dir, free_port(), free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_PASSWORD_")}
    env |= {password_var(u): "x" for u in USERS if u != "edge-2"}
    result = subprocess.run(
        [nats_binary(), "-c", str(conf), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "NATS_PASSWORD_EDGE_2" in result.stdout + result.stderr
    env[password_var("edge-2")] = "x"
    ok = subprocess.run(
        [nats_binary(), "-c", str(conf), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_passwords_must_start_with_a_letter(tmp_path: Path, tls_dir: Path) -> None:
    """Why docs/deploy.md makes "fg" + hex passwords: a ``$VAR`` value is a config token."""
    conf = localise(tmp_path, tls_dir, free_port(), free_port())

    def check(password: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ) | {password_var(u): "fg" + secrets.token_hex(8) for u in USERS}
        env[password_var("edge-2")] = password
        return subprocess.run(
            [nats_binary(), "-c", str(conf), "-t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    # a date, a number, a negative number: token_urlsafe made such values 8 times in 300
    for bad in ("12-Rk" + secrets.token_hex(8), "5" + "7" * 20, "-uE7" + secrets.token_hex(8)):
        refused = check(bad)
        assert refused.returncode != 0, bad
    assert "NATS_PASSWORD_EDGE_2" in check("1-x").stdout + check("1-x").stderr
    assert check("fg" + secrets.token_hex(24)).returncode == 0


async def test_a_wrong_password_is_refused(compose_nats: ComposeNats) -> None:
    compose_nats.passwords["edge-1"], good = "wrong", compose_nats.passwords["edge-1"]
    try:
        with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
            nc = await compose_nats.connect("edge-1")
            await nc.close()
    finally:
        compose_nats.passwords["edge-1"] = good


async def test_heartbeats_edge_publishes_only_its_own(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    sub = await clients["gateway"].subscribe(subjects.HEARTBEAT_ALL)
    await clients["gateway"].flush()
    await clients["edge-1"].publish(subjects.heartbeat("edge-1"), b"beat")
    assert (await sub.next_msg(timeout=2)).subject == subjects.heartbeat("edge-1")
    assert await compose_nats.violations(clients["edge-1"], "edge-1", expect=False) == []

    await clients["edge-1"].publish(subjects.heartbeat("edge-2"), b"forged")
    await clients["edge-1"].publish(subjects.leave("edge-2"), b"")
    await compose_nats.violation(clients["edge-1"], "edge-1", subjects.heartbeat("edge-2"))
    await compose_nats.violation(clients["edge-1"], "edge-1", subjects.leave("edge-2"))
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)

    for user in ["gateway", "trainer"]:
        await clients[user].publish(subjects.heartbeat("edge-1"), b"forged")
        assert await compose_nats.violations(clients[user], user), user


async def test_updates_edge_publishes_only_its_own_and_reads_none(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    trainer_js = clients["trainer"].jetstream()
    await trainer_js.add_stream(name=UPDATES_STREAM, subjects=[updates_filter()])
    edge_js = clients["edge-1"].jetstream()
    ack = await edge_js.publish(
        update_subject("digits", "edge-1"), b"sealed", stream=UPDATES_STREAM, timeout=2
    )
    assert ack.stream == UPDATES_STREAM

    with pytest.raises(nats.errors.Error):  # no permission: no ack ever comes
        await edge_js.publish(update_subject("digits", "edge-2"), b"forged", timeout=0.5)
    await clients["edge-1"].subscribe(updates_filter())
    await clients["edge-2"].subscribe("fedgate.>")
    await compose_nats.violation(
        clients["edge-1"], "edge-1", 'publish to "fedgate.updates.digits.edge-2'
    )
    await compose_nats.violation(clients["edge-1"], "edge-1", 'subscription to "fedgate.updates.>')
    await compose_nats.violation(clients["edge-2"], "edge-2", 'subscription to "fedgate.>')

    with pytest.raises(nats.errors.Error):  # edges cannot manage streams
        await clients["edge-1"].jetstream(timeout=0.5).delete_stream(UPDATES_STREAM)

    sub = await trainer_js.pull_subscribe(updates_filter(), durable="probe", stream=UPDATES_STREAM)
    msgs = await sub.fetch(1, timeout=2)
    assert [m.data for m in msgs] == [b"sealed"]
    assert msgs[0].subject == update_subject("digits", "edge-1")
    await msgs[0].ack()
    await trainer_js.delete_stream(UPDATES_STREAM)


async def test_large_updates_go_through_the_object_store(clients: dict[str, NATS]) -> None:
    trainer_js = clients["trainer"].jetstream()
    await trainer_js.create_object_store(UPDATES_OBJECT_BUCKET)
    try:
        store = await clients["edge-1"].jetstream().object_store(UPDATES_OBJECT_BUCKET)
        name = f"digits/edge-1/{secrets.token_hex(16)}"
        await store.put(name, b"x" * 300_000)
        got = await (await trainer_js.object_store(UPDATES_OBJECT_BUCKET)).get(name)
        assert got.data == b"x" * 300_000
    finally:
        await trainer_js.delete_object_store(UPDATES_OBJECT_BUCKET)


def test_an_edge_reads_only_its_own_per_edge_feedback() -> None:
    """The gateway sends a label for one edge on ``fedgate.feedback.<model>-<edge>``: no other
    edge may subscribe to it (a wildcard over ``fedgate.feedback.*`` let any edge read every
    other edge's labels)."""
    _, subscribe = edge_permissions("edge-1")
    assert subjects.feedback_to_edge("digits", "edge-1") in subscribe
    assert subjects.feedback("digits") in subscribe
    assert not [s for s in subscribe if s.startswith(subjects.FEEDBACK_PREFIX + ".") and "*" in s]


def test_the_committed_accounts_are_the_rendered_ones() -> None:
    assert (NATS_DIR / "accounts.conf").read_text() == render_accounts(["edge-1", "edge-2"])


async def test_edges_read_rounds_and_models_but_cannot_write_them(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    trainer_js = clients["trainer"].jetstream()
    rounds = await trainer_js.create_key_value(bucket=ROUNDS_BUCKET)
    models = await trainer_js.create_object_store(MODELS_BUCKET)
    try:
        await rounds.put("digits", b"round 1")
        await models.put("digits/2/model.onnx", b"m" * 200_000)
        edge_js = clients["edge-1"].jetstream(timeout=2)
        kv = await edge_js.key_value(ROUNDS_BUCKET)
        assert (await kv.get("digits")).value == b"round 1"
        watcher = await kv.watchall()
        entry = await watcher.updates(timeout=2)
        assert entry is not None and entry.value == b"round 1"
        await watcher.stop()
        store = await edge_js.object_store(MODELS_BUCKET)
        assert (await store.get("digits/2/model.onnx")).data == b"m" * 200_000
        assert await compose_nats.violations(clients["edge-1"], "edge-1", expect=False) == []

        weak = clients["edge-1"].jetstream(timeout=0.5)
        with pytest.raises(nats.errors.Error):
            await (await weak.key_value(ROUNDS_BUCKET)).put("digits", b"forged")
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await (await weak.object_store(MODELS_BUCKET)).put("digits/3/model.onnx", b"x")
        await compose_nats.violation(clients["edge-1"], "edge-1", 'publish to "$kv.fedgate_rounds')
        await compose_nats.violation(clients["edge-1"], "edge-1", 'publish to "$o.fedgate_models')
        assert (await rounds.get("digits")).value == b"round 1"
    finally:
        await trainer_js.delete_key_value(ROUNDS_BUCKET)
        await trainer_js.delete_object_store(MODELS_BUCKET)


async def test_gateway_reads_round_history_but_cannot_write_it(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    trainer_js = clients["trainer"].jetstream()
    log = await trainer_js.create_key_value(bucket=ROUND_LOG_BUCKET)
    try:
        await log.put("digits.000001", b"round 1")
        gateway_js = clients["gateway"].jetstream(timeout=2)
        assert await kv_keys(gateway_js, ROUND_LOG_BUCKET, "digits.*") == ["digits.000001"]
        kv = await gateway_js.key_value(ROUND_LOG_BUCKET)
        assert (await kv.get("digits.000001")).value == b"round 1"
        assert await compose_nats.violations(clients["gateway"], "gateway", expect=False) == []
        weak = clients["gateway"].jetstream(timeout=0.5)
        with pytest.raises(nats.errors.Error):
            await (await weak.key_value(ROUND_LOG_BUCKET)).put("digits.000002", b"forged")
        await compose_nats.violation(clients["gateway"], "gateway", "$kv.fedgate_round_log")
        with pytest.raises(nats.errors.Error):
            await clients["edge-1"].jetstream(timeout=0.5).key_value(ROUND_LOG_BUCKET)
    finally:
        await trainer_js.delete_key_value(ROUND_LOG_BUCKET)


async def test_feedback_reaches_edges_and_not_the_trainer(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok:" + msg.data)

    await clients["edge-1"].subscribe(subjects.feedback("digits"), cb=answer)
    await clients["edge-1"].flush()
    reply = await clients["gateway"].request(subjects.feedback("digits"), b"label", timeout=2)
    assert reply.data == b"ok:label"
    assert await compose_nats.violations(clients["edge-1"], "edge-1", expect=False) == []

    await clients["trainer"].subscribe("fedgate.feedback.>")
    await compose_nats.violation(clients["trainer"], "trainer", 'subscription to "fedgate.feedback')
    await clients["edge-1"].publish(subjects.feedback("digits"), b"not a reply")
    await clients["gateway"].publish(update_subject("digits", "edge-1"), b"forged")
    await compose_nats.violation(clients["edge-1"], "edge-1", 'publish to "fedgate.feedback.digits')
    await compose_nats.violation(clients["gateway"], "gateway", 'publish to "fedgate.updates')


async def test_an_edge_cannot_subscribe_to_another_edges_feedback(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok:" + msg.data)

    own = subjects.feedback_to_edge("digits", "edge-1")
    await clients["edge-1"].subscribe(own, cb=answer)
    await clients["edge-1"].flush()
    reply = await clients["gateway"].request(own, b"label", timeout=2)
    assert reply.data == b"ok:label"
    assert await compose_nats.violations(clients["edge-1"], "edge-1", expect=False) == []
    other = subjects.feedback_to_edge("digits", "edge-2")
    await clients["edge-1"].subscribe(other)
    await compose_nats.violation(clients["edge-1"], "edge-1", f'subscription to "{other}"')


async def test_a_client_certificate_logs_in_only_as_its_own_user(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    """``verify_and_map`` (#16 finding 11): the certificate names the user, whose password
    is then checked. On the old config edge-1's certificate with the trainer's password
    logged in as the trainer."""
    stolen = ssl.create_default_context(cafile=str(compose_nats.tls_dir / "ca.crt"))
    stolen.load_cert_chain(compose_nats.tls_dir / "edge-1.crt", compose_nats.tls_dir / "edge-1.key")
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        nc = await nats.connect(
            servers=[compose_nats.url],
            user="trainer",
            password=compose_nats.passwords["trainer"],
            tls=stolen,
            inbox_prefix=subjects.inbox_prefix("trainer"),
            connect_timeout=3,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
        await nc.close()
    # with its own certificate and password, edge-1 is edge-1: no trainer rights
    await clients["edge-1"].subscribe("fedgate.>")
    await compose_nats.violation(clients["edge-1"], "edge-1", 'subscription to "fedgate.>')


async def test_an_edge_cannot_subscribe_to_another_users_inbox(
    compose_nats: ComposeNats, clients: dict[str, NATS]
) -> None:
    for inbox in ("_INBOX.>", subjects.inbox_all("trainer"), subjects.inbox_all("edge-2")):
        await clients["edge-1"].subscribe(inbox)
        await compose_nats.violation(clients["edge-1"], "edge-1", f'subscription to "{inbox}"')
    assert clients["edge-1"].new_inbox().startswith(subjects.inbox_prefix("edge-1") + ".")
