"""The local nats-server's configuration: JetStream on disk, one user per service with the
permissions of its role (:mod:`fedgate.nats_accounts`, as in compose and Kubernetes),
optional mTLS."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedgate.nats_accounts import Permissions, certificate_user


@dataclass(frozen=True)
class NatsTls:
    """Server TLS for client connections. ``verify``: clients must present a certificate
    signed by ``ca_file`` (mutual TLS); a client without one is refused at the handshake.
    ``map_users`` (with ``verify``): the certificate names the NATS user
    (``verify_and_map``; users are then named :func:`certificate_user`), so a client's
    certificate logs in as that client only, whatever user and password it sends."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    verify: bool = True
    timeout_s: float = 2.0
    map_users: bool = True

    @property
    def maps_users(self) -> bool:
        return self.verify and self.map_users

    def render(self) -> str:
        verify = (
            "  verify_and_map: true\n"
            if self.maps_users
            else f"  verify: {'true' if self.verify else 'false'}\n"
        )
        return (
            "tls {\n"
            f'  cert_file: "{self.cert_file}"\n'
            f'  key_file: "{self.key_file}"\n'
            f'  ca_file: "{self.ca_file}"\n'
            f"{verify}"
            f"  timeout: {self.timeout_s}\n"
            "}\n"
        )


def render_nats_config(
    *,
    host: str,
    port: int,
    monitor_port: int,
    store_dir: Path,
    users: Mapping[str, str],
    max_payload: int = 8 * 1024 * 1024,
    tls: NatsTls | None = None,
    permissions: Mapping[str, Permissions] | None = None,
) -> str:
    """nats-server config text. ``users`` maps user name to password; ``permissions``
    limits the users it names (a user without an entry may publish and subscribe to
    anything: tests and benchmarks); ``tls`` turns on TLS (mutual by default) for client
    connections, and with ``tls.map_users`` each user is the one its client certificate
    names (its password still checked); the monitoring port stays plain HTTP.

    ``sync_interval: always`` fsyncs every write before acknowledging it: acknowledged
    updates survive a power loss (see REFERENCE.md on JetStream durability).
    """
    limits = permissions or {}
    mapped = tls is not None and tls.maps_users
    user_lines = ",\n".join(
        _user(certificate_user(name) if mapped else name, password, limits.get(name))
        for name, password in users.items()
    )
    return (
        "server_name: fedgate_local\n"
        f"listen: {host}:{port}\n"
        f"http: {host}:{monitor_port}\n"
        f"max_payload: {max_payload}\n"
        "jetstream {\n"
        f'  store_dir: "{store_dir}"\n'
        "  sync_interval: always\n"
        "}\n"
        f"{tls.render() if tls is not None else ''}"
        "authorization {\n"
        "  users: [\n"
        f"{user_lines}\n"
        "  ]\n"
        "}\n"
    )


def _user(name: str, password: str, permissions: Permissions | None) -> str:
    if permissions is None:
        return f'    {{ user: "{name}", password: "{password}" }}'
    return (
        f'    {{\n      user: "{name}"\n      password: "{password}"\n'
        f"{permissions.render(' ' * 6)}    }}"
    )


def write_nats_config(path: Path, text: str) -> None:
    """Write the config with mode 0600: it holds passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def clustered(
    text: str, server_name: str, host: str, route_port: int, peer_ports: list[int]
) -> str:
    """A node of a local JetStream cluster: ``text`` (:func:`render_nats_config`) renamed
    ``server_name``, listening for routes on ``route_port`` and routed to its peers'."""
    head, sep, rest = text.partition("\n")
    if not head.startswith("server_name: ") or not sep:
        raise ValueError("not a config from render_nats_config")
    routes = ",\n".join(f'    "nats://{host}:{p}"' for p in peer_ports)
    return (
        f"server_name: {server_name}\n{rest}"
        f"cluster {{\n  name: fedgate_local\n  listen: {host}:{route_port}\n"
        f"  routes: [\n{routes}\n  ]\n}}\n"
    )
