"""Shared fixtures: a signed version 1 of ``digits``, built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedcore.keys import generate_ed25519, public_hex
from fedcore.models import get_spec
from fedcore.process import ManagedProcess


@dataclass(frozen=True)
class SignedArtifacts:
    artifacts: Path  # <artifacts>/digits/1/
    params: np.ndarray  # the flat parameters version 1 was exported from
    private_key: Path
    public_hex: str


@pytest.fixture(scope="session")
def signed_v1(tmp_path_factory: pytest.TempPathFactory) -> SignedArtifacts:
    from trainer.bootstrap import train_seed_model, write_version

    root = tmp_path_factory.mktemp("artifacts")
    key_path = root / "keys" / "signing.key"
    key = generate_ed25519(key_path)
    spec = get_spec("digits")
    params = train_seed_model(spec, fraction=0.2, epochs=3, seed=0)
    write_version(spec, params, root / "artifacts" / "digits" / "1", key, version=1)
    unseal(root / "artifacts" / "digits" / "1")  # tests copy it and tamper with the copies
    return SignedArtifacts(root / "artifacts", params, key_path, public_hex(key))


def unseal(directory: Path) -> None:
    """Make a version directory written by ``write_version`` (files 0440, directory 0550)
    writable again, for tests that tamper with it or its copies (``shutil.copytree``
    copies the modes), also when they do not run as root."""
    os.chmod(directory, 0o750)
    for entry in directory.iterdir():
        entry.chmod(0o640)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry}: {cmdline.strip()}")
    return found


@dataclass(frozen=True)
class NatsServer:
    url: str
    users: dict[str, str]  # user -> password
    password_files: dict[str, Path]
    store_dir: Path
    process: ManagedProcess


def start_nats(
    root: Path, users: list[str], roles: bool = False, max_payload: int = 8 * 1024 * 1024
) -> NatsServer:
    """A real nats-server with JetStream on disk and one password user per name; with
    ``roles``, each user gets the permissions of its role (``fedgate.nats_accounts``);
    ``max_payload`` is the server's largest message."""
    import secrets
    import shutil
    import sys
    import urllib.request

    from fedcore.keys import write_secret
    from fedcore.process import free_port
    from fedgate.nats_accounts import role_permissions
    from fedgate.natsconf import render_nats_config, write_nats_config

    passwords = {u: secrets.token_urlsafe(16) for u in users}
    files = {}
    for user, password in passwords.items():
        files[user] = root / "secrets" / f"nats-{user}.pass"
        write_secret(files[user], password)
    port, monitor = free_port(), free_port()
    conf = root / "nats.conf"
    store = root / "jetstream"
    write_nats_config(
        conf,
        render_nats_config(
            host="127.0.0.1",
            port=port,
            monitor_port=monitor,
            store_dir=store,
            users=passwords,
            permissions={u: role_permissions(u) for u in users} if roles else None,
            max_payload=max_payload,
        ),
    )
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"
    proc = ManagedProcess("nats-server", [binary, "-c", str(conf)], log_path=root / "nats.log")
    proc.start()

    def healthy() -> bool:
        url = f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200

    proc.wait_ready(healthy, timeout=30)
    return NatsServer(f"nats://127.0.0.1:{port}", passwords, files, store, proc)


def enroll_edges(server: NatsServer, edge_ids: list[str], user: str) -> None:
    """Mirror a registry of ``edge_ids`` (fresh keys) into the KV bucket ``fedgate_edges``
    as the trainer does, connected as ``user``: gateways and trainers accept heartbeats
    only from the active edges it lists."""
    import asyncio
    import concurrent.futures

    import nats
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fedcore.enrollment import EdgeRegistry
    from fedcore.subjects import inbox_prefix
    from trainer.registry import mirror_registry

    registry = EdgeRegistry()
    for edge_id in edge_ids:
        key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
        registry = registry.enroll(edge_id, key)

    async def mirror() -> None:
        nc = await nats.connect(
            server.url, user=user, password=server.users[user], inbox_prefix=inbox_prefix(user)
        )
        try:
            await mirror_registry(nc.jetstream(), registry)
        finally:
            await nc.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # callers may run in a loop
        pool.submit(asyncio.run, mirror()).result()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server per test, users ``trainer``, ``gateway``, ``edge-1..3``."""
    server = start_nats(tmp_path / "nats", ["trainer", "gateway", "edge-1", "edge-2", "edge-3"])
    yield server
    server.process.stop()
