"""The local nats-server's configuration: JetStream on disk, one user per service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def render_nats_config(
    *,
    host: str,
    port: int,
    monitor_port: int,
    store_dir: Path,
    users: Mapping[str, str],
    max_payload: int = 8 * 1024 * 1024,
) -> str:
    """nats-server config text. ``users`` maps user name to password.

    ``sync_interval: always`` fsyncs every write before acknowledging it: acknowledged
    updates survive a power loss (see REFERENCE.md on JetStream durability).
    """
    user_lines = ",\n".join(
        f'    {{ user: "{name}", password: "{password}" }}' for name, password in users.items()
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
        "authorization {\n"
        "  users: [\n"
        f"{user_lines}\n"
        "  ]\n"
        "}\n"
    )


def write_nats_config(path: Path, text: str) -> None:
    """Write the config with mode 0600: it holds passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
