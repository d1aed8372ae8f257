"""``fedgate keys tls`` and mutual TLS against a real nats-server."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import secrets
import shutil
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.aio.client import Client as NATS

from fedcore.errors import FedgateError, KeyFileError
from fedcore.keys import write_secret
from fedcore.process import ManagedProcess, free_port
from fedcore.settings import ServiceSettings
from fedgate.cli import main
from fedgate.natsconf import NatsTls, render_nats_config, write_nats_config
from fedgate.tls_cmd import TlsPlan, create_tls


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    code = main(
        ["keys", "tls", "--dir", str(d), "--edges", "2", "--hosts", "fg.example", "10.1.2.3"]
    )
    assert code == 0
    return d


def test_every_certificate_chains_to_the_ca_with_the_right_usage(tls_dir: Path) -> None:
    ca = _cert(tls_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(dt.UTC)
    for name in ["nats-server", "gateway-server", "trainer", "gateway", "edge-1", "edge-2"]:
        cert = _cert(tls_dir / f"{name}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert (tls_dir / f"{name}.key").stat().st_mode & 0o077 == 0, name
    client, server = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
    assert _usages(_cert(tls_dir / "edge-1.crt")) == {client}
    assert _usages(_cert(tls_dir / "gateway-server.crt")) == {server}
    assert _usages(_cert(tls_dir / "nats-server.crt")) == {server, client}  # cluster routes
    nats_sans = _sans(_cert(tls_dir / "nats-server.crt"))
    assert {"nats", "nats-2.nats-headless.fedgate.svc.cluster.local", "127.0.0.1"} <= nats_sans
    assert {"fg.example", str(ipaddress.ip_address("10.1.2.3"))} <= nats_sans
    assert {"gateway", "fg.example"} <= _sans(_cert(tls_dir / "gateway-server.crt"))
    assert (tls_dir / "ca.key").stat().st_mode & 0o077 == 0
    bundle = (tls_dir / "gateway-server.pem").read_text()
    assert "BEGIN CERTIFICATE" in bundle and "BEGIN PRIVATE KEY" in bundle


def test_rerun_keeps_the_ca_and_reissues_leaves(tmp_path: Path) -> None:
    create_tls(TlsPlan(tmp_path, ("edge-1",)))
    ca_before = (tmp_path / "ca.crt").read_bytes()
    leaf_before = (tmp_path / "edge-1.crt").read_bytes()
    create_tls(TlsPlan(tmp_path, ("edge-1", "site-7")))
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "edge-1.crt").read_bytes() != leaf_before
    _cert(tmp_path / "site-7.crt").verify_directly_issued_by(_cert(tmp_path / "ca.crt"))


@pytest.mark.parametrize("bad", ["Edge_1", "trainer", "-x", ""])
def test_bad_edge_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(FedgateError, match="not a valid edge id"):
        create_tls(TlsPlan(tmp_path, (bad,)))


def _settings(tmp_path: Path, tls_dir: Path, name: str | None) -> ServiceSettings:
    pw = tmp_path / "pw"
    write_secret(pw, "x")
    extra: dict[str, Path] = {}
    if name is not None:
        extra = {"cert": tls_dir / f"{name}.crt", "key": tls_dir / f"{name}.key"}
    return ServiceSettings(
        nats_user="u",
        nats_password_file=pw,
        nats_tls_ca_file=tls_dir / "ca.crt",
        nats_tls_cert_file=extra.get("cert"),
        nats_tls_key_file=extra.get("key"),
    )


def test_settings_tls_context(tmp_path: Path, tls_dir: Path) -> None:
    pw = tmp_path / "pw"
    write_secret(pw, "x")
    assert ServiceSettings(nats_user="u", nats_password_file=pw).nats_tls_context() is None
    ctx = _settings(tmp_path, tls_dir, "edge-1").nats_tls_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="go together"):
        ServiceSettings(nats_user="u", nats_password_file=pw, nats_tls_cert_file=pw)
    loose = tmp_path / "loose"
    shutil.copytree(tls_dir, loose)
    (loose / "edge-1.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        _settings(tmp_path, loose, "edge-1").nats_tls_context()


@dataclass(frozen=True)
class TlsNats:
    url: str
    password: str
    log: Path


@pytest.fixture
def tls_nats(tmp_path: Path, tls_dir: Path) -> Iterator[TlsNats]:
    password = secrets.token_urlsafe(16)
    port, monitor = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    tls = NatsTls(
        cert_file=tls_dir / "nats-server.crt",
        key_file=tls_dir / "nats-server.key",
        ca_file=tls_dir / "ca.crt",
    )
    write_nats_config(
        conf,
        render_nats_config(
            host="127.0.0.1",
            port=port,
            monitor_port=monitor,
            store_dir=tmp_path / "js",
            users={"edge-1": password},
            tls=tls,
        ),
    )
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
    proc = ManagedProcess("nats-server", [binary, "-c", str(conf)], log_path=tmp_path / "nats.log")
    proc.start()
    try:

        def healthy() -> bool:
            url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status) == 200

        proc.wait_ready(healthy, timeout=30)
        yield TlsNats(f"nats://127.0.0.1:{port}", password, tmp_path / "nats.log")
    finally:
        proc.stop()


async def _connect(server: TlsNats, tls: ssl.SSLContext | None) -> NATS:
    async def quiet(_: Exception) -> None:
        return None

    return await nats.connect(
        servers=[server.url],
        user="edge-1",
        password=server.password,
        tls=tls,
        connect_timeout=3,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=quiet,
    )


async def test_nats_accepts_a_client_certificate_from_the_ca(
    tmp_path: Path, tls_dir: Path, tls_nats: TlsNats
) -> None:
    nc = await _connect(tls_nats, _settings(tmp_path, tls_dir, "edge-1").nats_tls_context())
    try:
        sub = await nc.subscribe("probe")
        await nc.publish("probe", b"hello")
        assert (await sub.next_msg(timeout=2)).data == b"hello"
    finally:
        await nc.close()


def _handshake_errors(server: TlsNats, before: int, expect: str) -> None:
    """The server logged a TLS handshake error naming ``expect`` after byte ``before``."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = server.log.read_text(errors="replace")[before:]
        if "TLS handshake error" in text and expect in text:
            return
        time.sleep(0.05)
    raise AssertionError(f"no TLS handshake error with {expect!r} in {text!r}")


async def test_nats_refuses_a_client_without_a_certificate(
    tmp_path: Path, tls_dir: Path, tls_nats: TlsNats
) -> None:
    no_cert = _settings(tmp_path, tls_dir, None).nats_tls_context()
    assert no_cert is not None
    before = len(tls_nats.log.read_text(errors="replace"))
    with pytest.raises(OSError):
        nc = await _connect(tls_nats, no_cert)
        await nc.close()
    _handshake_errors(tls_nats, before, "didn't provide a certificate")


async def test_nats_refuses_a_certificate_from_another_ca(
    tmp_path: Path, tls_dir: Path, tls_nats: TlsNats
) -> None:
    other = tmp_path / "other-ca"
    create_tls(TlsPlan(other, ("edge-1",)))
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))  # trusts the real server
    ctx.load_cert_chain(other / "edge-1.crt", other / "edge-1.key")  # a stranger's certificate
    before = len(tls_nats.log.read_text(errors="replace"))
    with pytest.raises(OSError):
        nc = await _connect(tls_nats, ctx)
        await nc.close()
    _handshake_errors(tls_nats, before, "unknown authority")


def test_nats_refuses_plaintext(tls_nats: TlsNats) -> None:
    host, port = tls_nats.url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        info = json.loads(sock.recv(65536).decode().removeprefix("INFO ").strip())
        assert info["tls_required"] is True and info["tls_verify"] is True
        connect = {"user": "edge-1", "pass": tls_nats.password, "verbose": False}
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                reply += chunk
    assert b"PONG" not in reply
