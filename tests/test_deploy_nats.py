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

from fedcore import subjects
from fedcore.process import ManagedProcess, free_port
from fedcore.transport import UPDATES_OBJECT_BUCKET, UPDATES_STREAM, update_subject, updates_filter
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
            connect_timeout=3,
            allow_reconnect=False,
            error_cb=on_error,
        )

    async def violations(self, nc: NATS, user: str) -> list[str]:
        await nc.flush(timeout=2)
        await asyncio.sleep(0.1)
        return [e for e in self.errors.get(user, []) if "ermissions" in e]


@pytest.fixture(scope="module")
def compose_nats(tmp_path_factory: pytest.TempPathFactory, tls_dir: Path) -> Iterator[ComposeNats]:
    root = tmp_path_factory.mktemp("nats")
    port, monitor = free_port(), free_port()
    conf = localise(root / "conf", tls_dir, port, monitor)
    passwords = {u: secrets.token_urlsafe(16) for u in USERS}
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
    assert await compose_nats.violations(clients["edge-1"], "edge-1") == []

    await clients["edge-1"].publish(subjects.heartbeat("edge-2"), b"forged")
    await clients["edge-1"].publish(subjects.leave("edge-2"), b"")
    found = await compose_nats.violations(clients["edge-1"], "edge-1")
    assert any(subjects.heartbeat("edge-2") in v for v in found), found
    assert any(subjects.leave("edge-2") in v for v in found), found
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
    found = await compose_nats.violations(clients["edge-1"], "edge-1")
    assert any("edge-2" in v for v in found), found
    assert any("subscription" in v.lower() for v in found), found
    assert await compose_nats.violations(clients["edge-2"], "edge-2")

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
