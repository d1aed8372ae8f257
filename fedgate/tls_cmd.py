"""``fedgate keys tls``: a development CA and the certificates the deployments mount.

Writes into one directory (default ``secrets/tls``):

```
ca.crt, ca.key                      the development CA (the key is reused when present)
nats-server.crt, nats-server.key    NATS server and cluster routes (serverAuth + clientAuth)
gateway-server.crt/.key/.pem        the gateway's HTTPS certificate (.pem: chain + key, for proxies)
trainer.crt/.key, gateway.crt/.key  NATS client certificates (mTLS)
<edge>.crt, <edge>.key              one NATS client certificate per edge
```

Client certificates have the subject ``CN=<name>,O=fedgate`` and no SAN: nats-server maps
the NATS user from that subject (``verify_and_map``, see
:func:`fedgate.nats_accounts.certificate_user`).
Private keys are written with mode 0600. Keys are ECDSA P-256, signatures SHA-256. The
server certificates carry SANs for the compose service names, the Kubernetes service and
pod names in ``--namespace``, loopback, and every ``--hosts`` entry. This is a development
CA: production deployments bring certificates from their own PKI (for example
cert-manager) with the same file names.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.edge_id import is_edge_id
from fedcore.errors import FedgateError
from fedcore.files import write_atomic

log = logging.getLogger(__name__)

ORG = "fedgate"
CA_DAYS = 5 * 365
LEAF_DAYS = 397
NATS_CLUSTER_PODS = 3
SAN = x509.DNSName | x509.IPAddress


@dataclass(frozen=True)
class TlsPlan:
    """What to issue: edge ids, extra host names, the Kubernetes namespace."""

    directory: Path
    edges: tuple[str, ...]
    hosts: tuple[str, ...] = ()
    namespace: str = "fedgate"


@dataclass(frozen=True)
class Issued:
    """One certificate written to disk."""

    name: str
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode)  # a fresh file: a re-issued key never lands in a loose one


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def load_or_create_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in ``directory``: reused when ``ca.crt`` and ``ca.key`` exist, else created."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FedgateError(f"{key_path} is not an ECDSA key")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name("fedgate development CA")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("created development CA %s", cert_path)
    return cert, key


def _san(host: str) -> SAN:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by ``ca`` with the given SANs and extended key usages."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    if not usages:
        raise ValueError("a certificate needs server or client usage")
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    sans = list(dict.fromkeys(hosts))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def nats_hosts(namespace: str) -> list[str]:
    """SANs of the NATS server certificate: compose, Kubernetes service and pods, loopback."""
    svc = [f"nats.{namespace}.svc", f"nats.{namespace}.svc.cluster.local"]
    pods = []
    for i in range(NATS_CLUSTER_PODS):
        pod = f"nats-{i}.nats-headless"
        pods += [pod, f"{pod}.{namespace}.svc", f"{pod}.{namespace}.svc.cluster.local"]
    return ["nats", "nats-headless", *svc, *pods, "localhost", "127.0.0.1", "::1"]


def gateway_hosts(namespace: str) -> list[str]:
    """SANs of the gateway's HTTPS certificate (add public names with ``--hosts``)."""
    return [
        "gateway",
        "ingress",
        f"gateway.{namespace}.svc",
        f"gateway.{namespace}.svc.cluster.local",
        "localhost",
        "127.0.0.1",
        "::1",
    ]


def _save(
    directory: Path, name: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> Issued:
    cert, key = pair
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(name, cert_path, key_path)


def create_tls(plan: TlsPlan) -> list[Issued]:
    """Issue every certificate of ``plan`` (see the module docstring). Returns what it wrote."""
    for name in plan.edges:
        if not is_edge_id(name) or name in {"trainer", "gateway"}:
            raise FedgateError(f"edge id {name!r} is not a valid edge id")
    ca = load_or_create_ca(plan.directory)
    extra = list(plan.hosts)
    out = [
        _save(
            plan.directory,
            "nats-server",
            issue(ca, "nats", hosts=nats_hosts(plan.namespace) + extra, server=True, client=True),
        ),
    ]
    gateway = issue(ca, "gateway", hosts=gateway_hosts(plan.namespace) + extra, server=True)
    out.append(_save(plan.directory, "gateway-server", gateway))
    bundle = gateway[0].public_bytes(serialization.Encoding.PEM) + _key_pem(gateway[1])
    _write(plan.directory / "gateway-server.pem", bundle, 0o600)
    for name in ("trainer", "gateway", *plan.edges):
        out.append(_save(plan.directory, name, issue(ca, name, client=True)))
    return out


def edge_ids(count: int, explicit: Sequence[str]) -> tuple[str, ...]:
    """``edge-1..edge-<count>`` followed by explicit ids, without duplicates."""
    if count < 0:
        raise FedgateError("--edges must not be negative")
    return tuple(dict.fromkeys([*(f"edge-{i + 1}" for i in range(count)), *explicit]))


def cmd_tls(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """Entry point of ``fedgate keys tls``."""
    plan = TlsPlan(
        directory=args.dir,
        edges=edge_ids(args.edges, args.edge_id),
        hosts=tuple(args.hosts),
        namespace=args.namespace,
    )
    issued = create_tls(plan)
    out(f"CA: {plan.directory / 'ca.crt'}")
    for item in issued:
        out(f"{item.name}: {item.cert} {item.key}")
    return 0


def add_tls_parser(
    keys_sub: argparse._SubParsersAction[argparse.ArgumentParser], out: Callable[[str], None]
) -> None:
    """Register ``tls`` under the ``keys`` subcommand; ``out`` writes its report lines."""
    p = keys_sub.add_parser(
        "tls", help="create a development CA and the TLS certificates deployments mount"
    )
    p.add_argument("--dir", type=Path, default=Path("secrets/tls"), help="output directory")
    p.add_argument("--edges", type=int, default=2, help="client certs for edge-1..edge-N")
    p.add_argument("--edge-id", action="append", default=[], help="an extra edge id (repeatable)")
    p.add_argument(
        "--hosts", nargs="*", default=[], help="extra DNS names or IPs for the server certs"
    )
    p.add_argument("--namespace", default="fedgate", help="Kubernetes namespace for SANs")
    p.set_defaults(func=functools.partial(cmd_tls, out=out))
