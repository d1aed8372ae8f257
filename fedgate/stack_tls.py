"""TLS for the local stack (``fedgate up --tls``): the certificates under ``<data-dir>/tls``.

The certificates come from :func:`fedgate.tls_cmd.create_tls` (a development CA, the
nats-server certificate, one client certificate per service). They are reused on later
starts while they are still valid for this stack: every file present, each certificate
signed by the CA, matching its private key, inside its validity period with a day to
spare, private keys mode 0600, the nats-server certificate naming the stack's host, and
each client certificate's subject naming its NATS user (the server maps users from it).
Otherwise the leaves are issued again (and the CA too when it is the problem).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)

from fedgate.nats_accounts import certificate_user
from fedgate.natsconf import NatsTls
from fedgate.tls_cmd import TlsPlan, create_tls

log = logging.getLogger(__name__)

SERVER = "nats-server"
MIN_VALIDITY = dt.timedelta(days=1)
"""A certificate that expires sooner than this is issued again."""


@dataclass(frozen=True)
class StackTls:
    """The TLS files of one local stack: the CA, the nats-server pair, a pair per client."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def cert_file(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key_file(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def nats_server(self) -> NatsTls:
        """The nats-server's ``tls`` block: mutual TLS, clients need a certificate of the CA,
        and the certificate's subject names the NATS user (``verify_and_map``)."""
        return NatsTls(
            cert_file=self.cert_file(SERVER),
            key_file=self.key_file(SERVER),
            ca_file=self.ca_file,
            verify=True,
            map_users=True,
        )

    def client_settings(self, name: str) -> dict[str, str]:
        """The ``NATS_TLS_*`` settings (without the service's prefix) of client ``name``."""
        return {
            "NATS_TLS_CA_FILE": str(self.ca_file),
            "NATS_TLS_CERT_FILE": str(self.cert_file(name)),
            "NATS_TLS_KEY_FILE": str(self.key_file(name)),
        }

    def client_context(self, name: str) -> ssl.SSLContext:
        """An SSL context for a NATS client presenting ``name``'s certificate (tools, tests)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file(name), self.key_file(name))
        return ctx


def ensure_stack_tls(directory: Path, clients: Sequence[str], hosts: Sequence[str]) -> StackTls:
    """Reuse the certificates in ``directory`` when they are valid for ``clients`` (NATS
    users: ``trainer``, ``gateway``, the edges) and ``hosts`` (names the nats-server
    certificate must carry); otherwise issue them."""
    tls = StackTls(directory)
    edges = tuple(c for c in clients if c not in {"trainer", "gateway"})
    problems = tls_problems(directory, ["trainer", "gateway", *edges], hosts)
    if not problems:
        log.info("reusing the TLS certificates in %s", directory)
        return tls
    log.info("issuing TLS certificates in %s (%s)", directory, problems[0])
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(p.startswith("ca.") for p in problems):
        for name in ("ca.crt", "ca.key"):
            (directory / name).unlink(missing_ok=True)
    create_tls(TlsPlan(directory, edges, hosts=tuple(hosts)))
    return tls


def tls_problems(
    directory: Path,
    clients: Sequence[str],
    hosts: Sequence[str],
    now: dt.datetime | None = None,
) -> list[str]:
    """Why the certificates in ``directory`` cannot be reused (empty: they can). Each
    entry starts with the file name it is about."""
    at = now or dt.datetime.now(dt.UTC)
    ca_problems = _pair_problems(directory, "ca", None, at)
    if ca_problems:
        return ca_problems
    ca = _load_cert(directory / "ca.crt")
    problems: list[str] = []
    for name in [SERVER, *clients]:
        problems += _pair_problems(directory, name, ca, at)
    if not problems:
        problems += _missing_hosts(directory / f"{SERVER}.crt", hosts)
    for name in clients if not problems else []:
        subject = _load_cert(directory / f"{name}.crt").subject.rfc4514_string()
        if subject != certificate_user(name):  # nats-server maps the user from it
            problems.append(f"{name}.crt names {subject!r}, not {certificate_user(name)!r}")
    return problems


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _pair_problems(
    directory: Path, name: str, ca: x509.Certificate | None, at: dt.datetime
) -> list[str]:
    """Problems of ``<name>.crt`` and ``<name>.key``; ``ca`` None: the CA itself."""
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    for path in (cert_path, key_path):
        if not path.is_file():
            return [f"{path.name} is missing"]
    if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        return [f"{key_path.name} is readable by group or others"]
    try:
        cert = _load_cert(cert_path)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(cert if ca is None else ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return [f"{cert_path.name} does not verify: {exc or type(exc).__name__}"]
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return [f"{key_path.name} does not match {cert_path.name}"]
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc - MIN_VALIDITY:
        return [f"{cert_path.name} is expired or expires within {MIN_VALIDITY.days} day"]
    return []


def _spki(public: CertificatePublicKeyTypes | PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _missing_hosts(cert_path: Path, hosts: Sequence[str]) -> list[str]:
    cert = _load_cert(cert_path)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [f"{cert_path.name} has no subject alternative names"]
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    names |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    missing = [h for h in hosts if h not in names]
    return [f"{cert_path.name} does not name {', '.join(missing)}"] if missing else []
