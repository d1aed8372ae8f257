"""NATS client certificates are tied to NATS users (#16 finding 11, the NATS part).

``fedgate up --tls`` renders ``verify_and_map``: nats-server takes the user from the
client certificate's subject (``CN=<user>,O=fedgate``) and then checks that user's
password. On the old config the server only checked that a certificate came from the CA,
so edge-1's certificate with the trainer's password logged in as the trainer.

The nats-server here is the one the launcher starts with ``--tls`` (same certificates,
config and per-role permissions as ``fedgate up --tls``), without the other services.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cryptography import x509

from fedcore.subjects import inbox_prefix
from fedgate.launcher import Stack, StackConfig
from fedgate.nats_accounts import certificate_user
from fedgate.stack_tls import ensure_stack_tls
from tests.conftest import processes_mentioning

EDGES = ["edge-1", "edge-2"]


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("identity-nats")
    stack = Stack(StackConfig(data_dir=data_dir, edges=len(EDGES), tls=True))
    try:
        # as Stack.start does with --tls, then the nats-server alone
        stack.tls = ensure_stack_tls(
            data_dir / "tls", ["trainer", "gateway", *EDGES], ["127.0.0.1"]
        )
        stack._start_nats()
        yield stack
    finally:
        stack.stop()
    assert processes_mentioning(str(data_dir)) == []


def _password(stack: Stack, user: str) -> str:
    return (stack.config.data_dir / "secrets" / f"nats-{user}.pass").read_text().strip()


def _context(stack: Stack, cert: str) -> ssl.SSLContext:
    assert stack.tls is not None
    return stack.tls.client_context(cert)


ERRORS: dict[str, list[str]] = {}
"""Asynchronous errors (permission violations) the server sent, by certificate."""


async def _connect(stack: Stack, *, cert: str, user: str, password: str) -> nats.NATS:
    errors = ERRORS.setdefault(cert, [])

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        stack.nats_url,
        user=user,
        password=password,
        tls=_context(stack, cert),
        inbox_prefix=inbox_prefix(user),
        connect_timeout=3,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=on_error,
    )
    return nc


def _authorized_users(stack: Stack) -> list[str]:
    conf = (stack.config.data_dir / "nats" / "nats.conf").read_text()
    monitor = next(line.split(":")[-1] for line in conf.splitlines() if line.startswith("http: "))
    url = f"http://127.0.0.1:{monitor}/connz?auth=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return [c.get("authorized_user", "") for c in json.loads(resp.read())["connections"]]


def test_the_config_maps_users_from_certificates(tls_stack: Stack) -> None:
    text = (tls_stack.config.data_dir / "nats" / "nats.conf").read_text()
    assert "verify_and_map: true" in text and "verify: true" not in text
    for user in ["trainer", "gateway", *EDGES]:
        assert f'user: "{certificate_user(user)}"' in text, user


async def test_an_edge_certificate_cannot_log_in_as_the_trainer(tls_stack: Stack) -> None:
    trainer_password = _password(tls_stack, "trainer")
    for user in ("trainer", "CN=trainer,O=fedgate"):
        with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
            nc = await _connect(tls_stack, cert="edge-1", user=user, password=trainer_password)
            await nc.close()
    # the trainer's certificate with edge-1's password is not edge-1 either
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        nc = await _connect(
            tls_stack, cert="trainer", user="edge-1", password=_password(tls_stack, "edge-1")
        )
        await nc.close()


async def test_each_certificate_is_its_own_user(tls_stack: Stack) -> None:
    edge = await _connect(
        tls_stack, cert="edge-1", user="edge-1", password=_password(tls_stack, "edge-1")
    )
    trainer = await _connect(
        tls_stack, cert="trainer", user="trainer", password=_password(tls_stack, "trainer")
    )
    try:
        await edge.flush(timeout=3)
        await trainer.flush(timeout=3)
        users = _authorized_users(tls_stack)
        assert certificate_user("edge-1") in users and certificate_user("trainer") in users
        # edge-1 has edge-1's rights only: a trainer action is refused
        ERRORS["edge-1"].clear()  # earlier tests' refused logins with this certificate
        await edge.subscribe("fedgate.>")
        await edge.flush(timeout=3)
        for _ in range(200):  # the violation comes asynchronously (slow on a busy machine)
            if any('subscription to "fedgate.>"' in e for e in ERRORS["edge-1"]):
                break
            await asyncio.sleep(0.05)
        assert any('subscription to "fedgate.>"' in e for e in ERRORS["edge-1"]), ERRORS
        with pytest.raises(nats.errors.Error):
            await edge.jetstream(timeout=0.5).add_stream(name="HIJACK", subjects=["hijack.>"])
        # the trainer's certificate and password do what the trainer does
        info = await trainer.jetstream(timeout=3).add_stream(name="OWN", subjects=["own.>"])
        assert info.config.name == "OWN"
        await trainer.jetstream(timeout=3).delete_stream("OWN")
    finally:
        await edge.close()
        await trainer.close()


def test_the_mapped_users_are_the_subjects_of_the_issued_certificates(tmp_path: Path) -> None:
    """The mapping is by subject: the user names of the rendered configs are exactly the
    subjects ``fedgate keys tls`` writes into client certificates."""
    d = tmp_path / "tls"
    ensure_stack_tls(d, ["trainer", "gateway", "edge-1"], ["127.0.0.1"])
    for user in ["trainer", "gateway", "edge-1"]:
        cert = x509.load_pem_x509_certificate((d / f"{user}.crt").read_bytes())
        assert cert.subject.rfc4514_string() == certificate_user(user)
