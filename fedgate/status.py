"""``fedgate status``: the fleet of a running gateway as a table."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fedcore.errors import FedgateError
from fedcore.keys import read_secret

DEFAULT_KEY_FILE = Path(".fedgate/secrets/gateway-infer.key")


def api_key(key_file: Path | None) -> str | None:
    """The key to send: ``key_file``, else ``$FEDGATE_API_KEY``, else the local stack's."""
    if key_file is not None:
        return read_secret(key_file)
    if os.environ.get("FEDGATE_API_KEY"):
        return os.environ["FEDGATE_API_KEY"]
    return read_secret(DEFAULT_KEY_FILE) if DEFAULT_KEY_FILE.exists() else None


def print_status(url: str, out: Callable[[str], None], key_file: Path | None = None) -> int:
    """Print one row per edge. Returns the exit code."""
    key = api_key(key_file)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url.rstrip("/") + "/v1/edges", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - user-given gateway URL
            edges = json.loads(resp.read())["edges"]
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise FedgateError(f"the gateway at {url} answered {exc.code}: {detail}") from None
    except OSError as exc:
        raise FedgateError(f"cannot reach the gateway at {url}: {exc}") from None
    header = ("edge", "device", "models (ready versions)", "outstanding", "seen")
    out(f"{header[0]:<12} {header[1]:<7} {header[2]:<28} {header[3]:>11} {header[4]:>6}")
    for e in edges:
        models = ", ".join(f"{m} {s['ready']}" for m, s in e["models"].items())
        seen = f"{e['last_seen_s']:.1f}s"
        out(f"{e['edge_id']:<12} {e['device']:<7} {models:<28} {e['outstanding']:>11} {seen:>6}")
    out(f"{len(edges)} edge(s)")
    return 0
