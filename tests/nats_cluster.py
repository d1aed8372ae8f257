"""A real 3-node nats-server JetStream cluster on loopback for tests: three processes,
routes between them, one password user per name (with its role's permissions when asked),
ready once every server reports a healthy JetStream with a meta leader."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedcore.keys import write_secret
from fedcore.process import ManagedProcess, free_port
from fedgate.nats_accounts import role_permissions
from fedgate.natsconf import render_nats_config, write_nats_config
from tests.deploy_support import nats_binary


@dataclass(frozen=True)
class NatsCluster:
    urls: list[str]  # one client URL per server
    users: dict[str, str]  # user -> password
    password_files: dict[str, Path]
    processes: list[ManagedProcess]
    monitors: tuple[int, ...] = ()  # one HTTP monitoring port per server (/varz, /jsz)

    @property
    def url(self) -> str:
        """Every server, comma-separated, as the services' ``NATS_URL`` takes them."""
        return ",".join(self.urls)

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


def _cluster_block(name: str, port: int, routes: list[int]) -> str:
    lines = ",\n".join(f'    "nats://127.0.0.1:{p}"' for p in routes)
    return (
        f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{port}\n  routes: [\n{lines}\n  ]\n}}\n"
    )


def _healthy(monitor: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=2) as resp:
            return int(resp.status) == 200
    except urllib.error.HTTPError:  # 503 until JetStream has a meta leader
        return False


def start_nats_cluster(
    root: Path, users: list[str], *, size: int = 3, limited: tuple[str, ...] = ()
) -> NatsCluster:
    """``size`` nats-servers in one JetStream cluster; the users in ``limited`` get the
    permissions of their role (:mod:`fedgate.nats_accounts`), the others may do anything."""
    passwords = {u: secrets.token_hex(16) for u in users}
    files = {}
    for user, password in passwords.items():
        files[user] = root / "secrets" / f"nats-{user}.pass"
        write_secret(files[user], password)
    ports = [free_port() for _ in range(size)]
    routes = [free_port() for _ in range(size)]
    monitors = [free_port() for _ in range(size)]
    processes: list[ManagedProcess] = []
    try:
        for i in range(size):
            conf = root / f"n{i}" / "nats.conf"
            text = render_nats_config(
                host="127.0.0.1",
                port=ports[i],
                monitor_port=monitors[i],
                store_dir=root / f"n{i}" / "jetstream",
                users=passwords,
                permissions={u: role_permissions(u) for u in limited},
            )
            assert text.startswith("server_name: fedgate_local\n")
            text = text.replace("fedgate_local", f"fedgate_n{i}", 1)
            text += _cluster_block("fedgate_test", routes[i], [p for p in routes if p != routes[i]])
            write_nats_config(conf, text)
            proc = ManagedProcess(
                f"nats-server[n{i}]",
                [nats_binary(), "-c", str(conf)],
                log_path=root / f"n{i}" / "nats.log",
            )
            proc.start()
            processes.append(proc)
        for proc, monitor in zip(processes, monitors, strict=True):
            proc.wait_ready(lambda m=monitor: _healthy(m), timeout=60)
    except BaseException:
        for proc in processes:
            proc.stop()
        raise
    return NatsCluster(
        [f"nats://127.0.0.1:{p}" for p in ports], passwords, files, processes, tuple(monitors)
    )
