"""``fedgate up --tls``: every service talks to NATS over mutual TLS with its own client
certificate, and the stack's nats-server refuses anyone without one.

The certificate reuse rules (:mod:`fedgate.stack_tls`) are checked on their own first; then
one edge's stack runs as a user starts it, is used through the gateway, probed at its NATS
port and stopped with SIGTERM, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from fedcore.process import free_port
from fedcore.subjects import inbox_prefix
from fedgate.nats_accounts import certificate_user
from fedgate.stack_tls import StackTls, ensure_stack_tls, tls_problems
from fedgate.tls_cmd import TlsPlan, create_tls
from tests.conftest import processes_mentioning
from tests.test_stack import alive, descendants, start_up

CLIENTS = ["trainer", "gateway", "edge-1"]


# -- certificate reuse -------------------------------------------------------------------
def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_certificates_are_issued_once_and_reused(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    tls = ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    assert tls == StackTls(d) and d.stat().st_mode & 0o077 == 0
    assert tls_problems(d, CLIENTS, ["127.0.0.1"]) == []
    for name in ["ca", "nats-server", *CLIENTS]:
        assert (d / f"{name}.key").stat().st_mode & 0o777 == 0o600, name
    before = _snapshot(d)
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    assert _snapshot(d) == before


def test_a_new_edge_or_host_reissues_the_leaves_and_keeps_the_ca(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    ca, leaf = (d / "ca.crt").read_bytes(), (d / "edge-1.crt").read_bytes()
    assert tls_problems(d, [*CLIENTS, "edge-2"], ["127.0.0.1"]) == ["edge-2.crt is missing"]
    ensure_stack_tls(d, [*CLIENTS, "edge-2"], ["127.0.0.1"])
    assert (d / "ca.crt").read_bytes() == ca and (d / "edge-1.crt").read_bytes() != leaf
    assert tls_problems(d, CLIENTS, ["10.9.8.7"]) == ["nats-server.crt does not name 10.9.8.7"]
    ensure_stack_tls(d, CLIENTS, ["10.9.8.7"])
    assert tls_problems(d, [*CLIENTS, "edge-2"], ["10.9.8.7"]) == []


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: (d / "gateway.key").unlink(), "gateway.key is missing"),
        (lambda d: (d / "trainer.key").chmod(0o644), "trainer.key is readable by group or others"),
        (
            lambda d: (d / "edge-1.key").write_bytes((d / "trainer.key").read_bytes()),
            "edge-1.key does not match edge-1.crt",
        ),
        (lambda d: (d / "nats-server.crt").write_text("junk"), "nats-server.crt does not verify"),
    ],
    ids=["missing", "loose-mode", "wrong-key", "garbage"],
)
def test_a_damaged_leaf_is_reissued(tmp_path: Path, damage: Any, problem: str) -> None:
    d = tmp_path / "tls"
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    ca = (d / "ca.crt").read_bytes()
    damage(d)
    assert tls_problems(d, CLIENTS, ["127.0.0.1"])[0].startswith(problem)
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    assert tls_problems(d, CLIENTS, ["127.0.0.1"]) == []
    assert (d / "ca.crt").read_bytes() == ca


def test_leaves_of_another_ca_or_a_broken_ca_start_over(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    other = tmp_path / "other"
    create_tls(TlsPlan(other, ("edge-1",)))
    (d / "edge-1.crt").write_bytes((other / "edge-1.crt").read_bytes())
    (d / "edge-1.key").write_bytes((other / "edge-1.key").read_bytes())
    assert tls_problems(d, CLIENTS, ["127.0.0.1"])[0].startswith("edge-1.crt does not verify")
    (d / "ca.key").write_bytes((other / "ca.key").read_bytes())  # the CA pair is broken
    assert tls_problems(d, CLIENTS, ["127.0.0.1"]) == ["ca.key does not match ca.crt"]
    ca = (d / "ca.crt").read_bytes()
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    assert (d / "ca.crt").read_bytes() != ca
    assert tls_problems(d, CLIENTS, ["127.0.0.1"]) == []


def test_a_client_certificate_naming_another_user_is_reissued(tmp_path: Path) -> None:
    """nats-server maps the user from the certificate's subject (verify_and_map): a client
    certificate of the CA whose subject is not ``CN=<user>,O=fedgate`` cannot log in."""
    d = tmp_path / "tls"
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    for suffix in ("crt", "key"):  # a valid pair of the CA, but the gateway's
        (d / f"edge-1.{suffix}").write_bytes((d / f"gateway.{suffix}").read_bytes())
    (d / "edge-1.key").chmod(0o600)
    assert tls_problems(d, CLIENTS, ["127.0.0.1"]) == [
        "edge-1.crt names 'CN=gateway,O=fedgate', not 'CN=edge-1,O=fedgate'"
    ]
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    assert tls_problems(d, CLIENTS, ["127.0.0.1"]) == []


def test_certificates_near_their_end_are_reissued(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    ensure_stack_tls(d, CLIENTS, ["127.0.0.1"])
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=397)  # leaves last 397 days
    assert tls_problems(d, CLIENTS, ["127.0.0.1"], now=soon) == [
        f"{n}.crt is expired or expires within 1 day" for n in ["nats-server", *CLIENTS]
    ]
    late = dt.datetime.now(dt.UTC) + dt.timedelta(days=5 * 365)
    assert tls_problems(d, CLIENTS, ["127.0.0.1"], now=late) == [
        "ca.crt is expired or expires within 1 day"
    ]


# -- the stack ---------------------------------------------------------------------------
@dataclass
class TlsStack:
    url: str
    data_dir: Path
    proc: subprocess.Popen[str]
    output: str
    nats_port: int
    monitor_port: int

    @property
    def tls(self) -> StackTls:
        return StackTls(self.data_dir / "tls")

    def password(self, user: str) -> str:
        return (self.data_dir / "secrets" / f"nats-{user}.pass").read_text().strip()


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    data_dir = tmp_path_factory.mktemp("tls-stack")
    port = free_port()
    proc, output = start_up(["--tls", "--edges", "1"], port, data_dir)
    conf = (data_dir / "nats" / "nats.conf").read_text()
    listen = re.search(r"^listen: [\d.]+:(\d+)$", conf, re.M)
    monitor = re.search(r"^http: [\d.]+:(\d+)$", conf, re.M)
    assert listen is not None and monitor is not None
    running = TlsStack(
        f"http://127.0.0.1:{port}",
        data_dir,
        proc,
        "".join(output),
        int(listen[1]),
        int(monitor[1]),
    )
    yield running
    if proc.poll() is None:
        proc.kill()


def _connections(stack: TlsStack) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.monitor_port}/connz?auth=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        conns: list[dict[str, Any]] = json.loads(resp.read())["connections"]
    return conns


def test_every_service_presents_its_own_certificate(tls_stack: TlsStack) -> None:
    assert f"nats:     tls://127.0.0.1:{tls_stack.nats_port}" in tls_stack.output
    assert "tls {" in (tls_stack.data_dir / "nats" / "nats.conf").read_text()
    deadline = time.monotonic() + 30
    while True:
        seen = {
            c["authorized_user"]: (c.get("tls_version"), c["tls_peer_certs"][0]["subject"])
            for c in _connections(tls_stack)
        }
        if set(seen) >= {certificate_user(u) for u in CLIENTS} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # users are mapped from the certificates (verify_and_map): named by their subject
    assert seen == {certificate_user(u): ("1.3", f"CN={u},O=fedgate") for u in CLIENTS}


def test_inference_through_the_gateway(tls_stack: TlsStack) -> None:
    key = (tls_stack.data_dir / "secrets" / "gateway-infer.key").read_text().strip()
    body = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": [0.5] * 128}]}
    ).encode()
    req = urllib.request.Request(
        tls_stack.url + "/v2/models/digits/infer",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["x-fedgate-edge"] == "edge-1"  # routed from NATS heartbeats
        outputs = json.loads(resp.read())["outputs"]
    assert outputs[0]["name"] == "logits" and outputs[0]["shape"] == [2, 10]


def test_plaintext_is_refused(tls_stack: TlsStack) -> None:
    with socket.create_connection(("127.0.0.1", tls_stack.nats_port), timeout=5) as sock:
        info = json.loads(sock.recv(65536).decode().removeprefix("INFO ").strip())
        assert info["tls_required"] is True and info["tls_verify"] is True
        connect = {"user": "trainer", "pass": tls_stack.password("trainer"), "verbose": False}
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                reply += chunk
    assert b"PONG" not in reply


async def _connect(stack: TlsStack, user: str, tls: ssl.SSLContext) -> NATS:
    async def quiet(_: Exception) -> None:
        return None

    return await nats.connect(
        servers=[f"tls://127.0.0.1:{stack.nats_port}"],
        user=user,
        password=stack.password(user),
        tls=tls,
        inbox_prefix=inbox_prefix(user),
        connect_timeout=3,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=quiet,
    )


async def test_a_client_without_a_certificate_is_refused(tls_stack: TlsStack) -> None:
    no_cert = ssl.create_default_context(cafile=str(tls_stack.tls.ca_file))
    with pytest.raises(OSError):
        nc = await _connect(tls_stack, "trainer", no_cert)
        await nc.close()
    nc = await _connect(tls_stack, "trainer", tls_stack.tls.client_context("trainer"))
    await nc.flush(timeout=3)  # the same user with its certificate gets in
    await nc.close()


def test_zz_sigterm_stops_everything(tls_stack: TlsStack) -> None:
    children = descendants(tls_stack.proc.pid)
    assert len(children) >= 5  # nats, trainer, edge, tritonserver, stub, gateway
    tls_stack.proc.send_signal(signal.SIGTERM)
    assert tls_stack.proc.wait(timeout=90) == 0
    assert [p for p in children if alive(p)] == []
    assert processes_mentioning(str(tls_stack.data_dir)) == []
