"""``fedgate status``: the fleet of a running gateway as a table."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

from fedcore.errors import FedgateError


def print_status(url: str, out: Callable[[str], None]) -> int:
    """Print one row per edge. Returns the exit code."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/edges", timeout=5) as resp:  # noqa: S310 - user-given gateway URL
            edges = json.loads(resp.read())["edges"]
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
