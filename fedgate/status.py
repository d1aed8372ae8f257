"""``fedgate status``: fleet, versions, rounds and rollouts of a running gateway, as tables.

When a ``fedgate up`` runs on ``--data-dir`` (default ``.fedgate``), its processes come
first: state, pid, restarts (and, for each edge, its Triton's restarts, read from the
edge runtime's metrics), the last exit; from the launcher's status file, so they show
while the gateway itself is down too.

It reads the gateway's JSON API with an API key: ``--key-file``, else ``$FEDGATE_API_KEY``,
else the local stack's admin key (``.fedgate/secrets/gateway-admin.key``, which may read
rollouts), else its infer key. A section the gateway cannot answer (no NATS, no rollout
API, a key without the role) prints why instead of its table; only an unreachable
gateway or a refused key fail the command.

Tables are rich tables (:mod:`fedgate.display`): drawn on a terminal, plain text in a
pipe; each metric column names the model's metric, with its direction under the table.
``--output json`` prints the same data as the gateway answers it (:func:`status_document`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.text import Text

from fedcore.errors import FedgateError, UnreachableError
from fedcore.keys import read_secret
from fedcore.task import METRICS
from fedgate.display import render, render_table
from fedgate.restarts import read_status, status_rows

DEFAULT_KEY_FILES = (
    Path(".fedgate/secrets/gateway-admin.key"),
    Path(".fedgate/secrets/gateway-infer.key"),
)
DEFAULT_KEY_FILE = DEFAULT_KEY_FILES[1]  # kept for callers of the old name
Out = Callable[[str], None]


class ApiError(FedgateError):
    """The gateway answered with an error status."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"the gateway at {url} answered {status}: {detail}")


def api_key(key_file: Path | None) -> str | None:
    """The key to send: ``key_file``, else ``$FEDGATE_API_KEY``, else the local stack's."""
    if key_file is not None:
        return read_secret(key_file)
    if os.environ.get("FEDGATE_API_KEY"):
        return os.environ["FEDGATE_API_KEY"]
    for path in DEFAULT_KEY_FILES:
        if path.exists():
            return read_secret(path)
    return None


class Gateway:
    """JSON requests to the gateway with the key (and a CA file for an HTTPS gateway)."""

    def __init__(
        self, url: str, key: str | None, timeout_s: float = 5.0, cacert: Path | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s
        self.context = ssl.create_default_context(cafile=str(cacert)) if cacert else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One request; :class:`ApiError` when the gateway answers an error status,
        :class:`UnreachableError` when it cannot be reached."""
        headers = dict(self.headers)
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self.context) as resp:  # noqa: S310
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                detail = str(json.loads(text).get("error", text))
            except (ValueError, AttributeError):
                detail = text
            raise ApiError(self.url, exc.code, detail) from None
        except OSError as exc:
            raise UnreachableError(f"cannot reach the gateway at {self.url}: {exc}") from None


def client_options(p: argparse.ArgumentParser, role: str) -> None:
    """``--url``, ``--key-file`` and ``--cacert`` of the commands that call the gateway."""
    p.add_argument(
        "--url",
        default=os.environ.get("FEDGATE_URL", "http://127.0.0.1:8080"),
        help="gateway URL (default $FEDGATE_URL, else the local stack's http://127.0.0.1:8080; "
        "compose publishes https://<host>:8443)",
    )
    local = "gateway-admin.key" if role == "admin" else "gateway-admin.key, else gateway-infer.key"
    p.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help=f"file with a gateway API key of role {role} (default: $FEDGATE_API_KEY, else the "
        f"local stack's .fedgate/secrets/{local})",
    )
    p.add_argument(
        "--cacert",
        type=Path,
        default=Path(os.environ["FEDGATE_CACERT"]) if os.environ.get("FEDGATE_CACERT") else None,
        help="CA file that signs an HTTPS gateway's certificate (default $FEDGATE_CACERT, else "
        "the system's)",
    )


def _title(out: Out, title: str, fancy: bool) -> None:
    out(render(Text(title, style="bold"), fancy=True)[0] if fancy else title)


def _emit(out: Out, title: str, lines: list[str], fancy: bool = False) -> None:
    out("")
    _title(out, title, fancy)
    for text in lines:
        out("  " + text)


def fleet_rows(edges: list[dict[str, Any]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for e in edges:
        if e["ejected"]:
            health = f"ejected {e['ejected_for_s']:.0f}s"
        elif e["failures"]:
            health = f"{e['failures']} failures"
        else:
            health = "ok"
        models = ", ".join(
            f"{m} {','.join(f'v{v}' for v in s['ready']) or 'none ready'}"
            for m, s in e["models"].items()
        )
        seen = f"{e['last_seen_s']:.1f}s"
        rows.append(
            [e["edge_id"], e["device"], health, models, e["outstanding"], e["served"], seen]
        )
    return rows


def version_rows(
    lineage: list[dict[str, Any]], edges: list[dict[str, Any]], model: str
) -> list[list[object]]:
    served: dict[int, list[str]] = {}
    for e in edges:
        for v in e["models"].get(model, {}).get("ready", []):
            served.setdefault(v, []).append(e["edge_id"])
    by_version = {v["version"]: v for v in lineage}
    rows: list[list[object]] = []
    for version in sorted(set(by_version) | set(served)):
        v = by_version.get(version, {})
        rows.append(
            [
                f"v{version}",
                f"v{v['parent_version']}" if v.get("parent_version") else None,
                v.get("round"),
                v.get("strategy"),
                v.get("samples"),
                v.get("value", v.get("accuracy")),
                ", ".join(served.get(version, [])) or None,
            ]
        )
    return rows


def metric_name(records: list[dict[str, Any]]) -> str:
    """The model's gate metric as its records name it (older records: accuracy)."""
    named = [r["metric"] for r in records if isinstance(r, dict) and r.get("metric")]
    return str(named[-1]) if named else "accuracy"


def better(metric: str) -> list[str]:
    """The line under a table with ``metric`` that says which way it is better (none for
    a metric this CLI does not know)."""
    spec = METRICS.get(metric)
    return [f"({metric}: {spec.direction} is better)"] if spec is not None else []


def round_rows(rounds: list[dict[str, Any]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for r in reversed(rounds):
        versions = f"v{r['base_version']}"
        if r.get("released_version"):
            versions += f" -> v{r['released_version']}"
        edges: object = len(r.get("contributors", []))
        if r.get("secure"):  # securely aggregated: who is in the sum, who dropped out
            edges = f"{r.get('survivors')} ({r.get('dropped')} dropped)"
        rows.append(
            [
                r["round"],
                f"{r['mode']} secure" if r.get("secure") else r["mode"],
                r["outcome"],
                versions,
                edges,
                r.get("value", r.get("accuracy")),
                r.get("loss"),
                r["reason"],
            ]
        )
    return rows


def rollout_rows(rollouts: list[dict[str, Any]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for r in rollouts:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_ts"]))
        weight = f"{r.get('weight', 0) * 100:g}%" if r["state"] == "canary" else None
        versions = [f"v{r['version']}", f"v{r['stable']}"]
        rows.append([r["id"], *versions, r["state"], weight, started, r.get("reason")])
    return rows


def _section(out: Out, title: str, fetch: Callable[[], list[str]], fancy: bool) -> None:
    try:
        lines = fetch()
    except ApiError as exc:
        if exc.status == 404 and exc.detail == "Not Found":
            lines = ["(this gateway has no such API)"]
        elif exc.status == 403:
            lines = [f"(needs an admin key: {exc.detail})"]
        else:
            lines = [f"(unavailable: {exc.status} {exc.detail})"]
    _emit(out, title, lines, fancy)


def _model_sections(
    gw: Gateway, out: Out, model: str, edges: list[Any], limit: int, fancy: bool
) -> None:
    base = f"/v1/models/{quote(model, safe='')}"
    table = functools.partial(render_table, fancy=fancy, margin=2)

    def versions() -> list[str]:
        listed = gw.get(f"{base}/versions")["versions"]
        rows = version_rows(listed, edges, model)
        metric = metric_name(listed)
        headers = ("version", "parent", "round", "strategy", "samples", metric, "served by")
        return [*table(headers, rows), *better(metric)] if rows else ["(no version)"]

    def rounds() -> list[str]:
        data = gw.get(f"{base}/rounds?limit={limit}")
        current = data.get("open")
        note = (
            f"round {current['round']} open ({current['mode']}, from v{current['base_version']})"
            if current and current.get("state") == "open"
            else "no round open"
        )
        rows = round_rows(data["rounds"])
        metric = metric_name(data["rounds"])
        headers = ("round", "mode", "outcome", "versions", "edges", metric, "loss", "reason")
        listed = [*table(headers, rows), *better(metric)] if rows else ["(no closed round)"]
        return [*listed, note]

    def rollouts() -> list[str]:
        rows = rollout_rows(gw.get(f"{base}/rollouts")["rollouts"])
        headers = ("rollout", "version", "stable", "state", "canary", "started", "reason")
        return table(headers, rows) if rows else ["(no rollout)"]

    _section(out, f"Versions of {model}", versions, fancy)
    _section(out, f"Rounds of {model} (last {limit})", rounds, fancy)
    _section(out, f"Rollouts of {model}", rollouts, fancy)


def triton_restarts(metrics_url: str | None, timeout_s: float = 2.0) -> int | None:
    """The sum of ``fedgate_edge_triton_restarts_total`` at an edge runtime's metrics URL
    (None when it cannot be read)."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:  # noqa: S310
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    found = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fedgate_edge_triton_restarts_total")
    ]
    return int(sum(found)) if found else None


def print_processes(data_dir: Path, out: Out, fancy: bool = False) -> bool:
    """The processes of the ``fedgate up`` running on ``data_dir``; False if none runs.
    ``fancy``: drawn for a terminal (:mod:`fedgate.display`)."""
    status = read_status(data_dir)
    if status is None:
        return False
    metrics: dict[str, str] = status.get("metrics", {})
    tritons = [
        triton_restarts(metrics.get(p["name"])) if p["name"].startswith("edge-") else None
        for p in status["processes"]
    ]
    headers = ("process", "state", "pid", "restarts", "triton restarts", "last exit")
    _title(out, f"Processes (fedgate up, pid {status['launcher_pid']}, {data_dir})", fancy)
    for text in render_table(headers, status_rows(status, tritons), fancy=fancy, margin=2):
        out("  " + text)
    out("")
    return True


def status_document(
    url: str,
    key_file: Path | None = None,
    *,
    model: str | None = None,
    rounds: int = 10,
    data_dir: Path | None = None,
    cacert: Path | None = None,
) -> dict[str, Any]:
    """What ``fedgate status --output json`` prints: the launcher's status file (None when
    no ``fedgate up`` runs on ``data_dir``), the gateway's fleet, and per model the
    gateway's answers for its versions, rounds and rollouts (``{"error", "status"}`` for a
    section it refused)."""
    gw = Gateway(url, api_key(key_file), cacert=cacert)
    edges: list[dict[str, Any]] = gw.get("/v1/edges")["edges"]
    models: dict[str, dict[str, Any]] = {}
    for name in [model] if model else sorted({m for e in edges for m in e["models"]}):
        base = f"/v1/models/{quote(name, safe='')}"
        paths = {
            "versions": f"{base}/versions",
            "rounds": f"{base}/rounds?limit={rounds}",
            "rollouts": f"{base}/rollouts",
        }
        models[name] = {}
        for section, path in paths.items():
            try:
                models[name][section] = gw.get(path)
            except ApiError as exc:
                models[name][section] = {"error": exc.detail, "status": exc.status}
    processes = read_status(data_dir) if data_dir is not None else None
    return {"gateway": gw.url, "processes": processes, "edges": edges, "models": models}


def print_status(
    url: str,
    out: Out,
    key_file: Path | None = None,
    *,
    model: str | None = None,
    rounds: int = 10,
    data_dir: Path | None = None,
    cacert: Path | None = None,
    fancy: bool = False,
) -> int:
    """Print the local stack's processes (when one runs on ``data_dir``), the fleet, then
    versions, rounds and rollouts of each model. Exit code. ``fancy``: tables drawn for
    a terminal; else plain text (:mod:`fedgate.display`)."""
    if data_dir is not None:
        print_processes(data_dir, out, fancy)
    gw = Gateway(url, api_key(key_file), cacert=cacert)
    edges: list[dict[str, Any]] = gw.get("/v1/edges")["edges"]
    headers = ("edge", "device", "health", "models (ready versions)", "outstanding", "served")
    _title(out, "Fleet", fancy)
    for text in render_table((*headers, "seen"), fleet_rows(edges), fancy=fancy, margin=2):
        out("  " + text)
    out(f"  {len(edges)} edge(s)")
    models = [model] if model else sorted({m for e in edges for m in e["models"]})
    for name in models:
        _model_sections(gw, out, name, edges, rounds, fancy)
    return 0
