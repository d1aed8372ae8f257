"""``fedgate rollout start|status|promote|rollback``: the gateway's rollout API from a shell.

The key is an admin key: ``--key-file``, else ``$FEDGATE_API_KEY``, else the local
stack's ``.fedgate/secrets/gateway-admin.key``. ``start --wait`` follows the rollout,
printing each event and each change of its state (live on a terminal), and exits 0 only
if it is promoted.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fedgate.display import is_terminal, render_table
from fedgate.progress import Wait, Waits, is_interactive
from fedgate.status import Gateway, api_key, client_options, rollout_rows

Out = Callable[[str], None]
ACTIVE = frozenset({"pending", "staging", "canary"})


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One JSON request to the gateway named by the options; :class:`ApiError` with its
    message on an error status, ``UnreachableError`` when it cannot be reached."""
    gateway = Gateway(args.url, api_key(args.key_file), timeout_s=30, cacert=args.cacert)
    return gateway.request(method, path, body)


def stages(text: str) -> list[float]:
    """``--stages 10,50``: percents of traffic, each in (0, 100]."""
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated percents of traffic, e.g. 10,50"
        ) from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each stage must be in (0, 100]")
    return values


def _path(model: str, rollout_id: str | None = None, action: str | None = None) -> str:
    path = f"/v1/models/{quote(model, safe='')}/rollouts"
    if rollout_id is not None:
        path += f"/{quote(rollout_id, safe='')}"
    if action is not None:
        path += f"/{action}"
    return path


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """The request body the options describe (only what was given; the gateway's defaults
    fill the rest)."""
    spec: dict[str, Any] = {"version": args.version}
    if args.stages:
        spec["stages"] = args.stages
    elif args.canary is not None:
        spec["canary"] = args.canary
    for name in ("window_s", "min_requests"):
        if getattr(args, name) is not None:
            spec[name] = getattr(args, name)
    gates = {
        name: getattr(args, name)
        for name in (
            "max_error_rate",
            "max_p99_ratio",
            "min_accuracy",
            "min_metric",
            "max_metric",
            "metric_margin",
            "min_labels",
        )
        if getattr(args, name) is not None
    }
    if gates:
        spec["gates"] = gates
    if args.no_auto_promote:
        spec["auto_promote"] = False
    return spec


def describe(r: dict[str, Any], out: Out) -> None:
    """A rollout: one summary line, the observation of a canary, then its events."""
    weight = f", {r['weight'] * 100:g}% of traffic" if r["state"] == "canary" else ""
    versions = f"v{r['version']} over v{r['stable']}"
    out(f"rollout {r['id']} of {r['model']}: {versions}: {r['state']}{weight}")
    if r.get("reason"):
        out(f"  reason: {r['reason']}")
    obs = r.get("observation")
    if obs:
        out(f"  observing {obs['elapsed_s']:.1f} s: {obs['verdict']}")
    for e in r["events"]:
        out(f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['kind']}: {e['message']}")


def cmd_start(args: argparse.Namespace, out: Out) -> int:
    r = call(args, "POST", _path(args.model), spec_of(args))
    versions = f"version {r['version']} over {r['stable']}"
    out(f"rollout {r['id']} of {r['model']}: {versions} ({r['state']})")
    if not args.wait:
        return 0
    with (
        Waits(out, live=is_interactive()) as waits,
        waits.wait(f"rollout {r['id']} of v{r['version']}") as wait,
    ):
        return follow(args, r["id"], wait, out)


def follow(args: argparse.Namespace, rollout_id: str, wait: Wait, out: Out) -> int:
    """Print each new event of a rollout, report its state to ``wait``, until it ends:
    0 if it was promoted, else 1."""
    seen = 0
    while True:
        r = call(args, "GET", _path(args.model, rollout_id))
        for e in r["events"][seen:]:
            out(f"  {e['kind']}: {e['message']}")
        seen = len(r["events"])
        weight = f" at {r['weight'] * 100:g}% of traffic" if r["state"] == "canary" else ""
        wait.state(f"{r['state']}{weight}")
        if r["state"] not in ACTIVE:
            return 0 if r["state"] == "promoted" else 1
        time.sleep(args.poll_s)


def cmd_status(args: argparse.Namespace, out: Out) -> int:
    if args.id is not None:
        describe(call(args, "GET", _path(args.model, args.id)), out)
        return 0
    rollouts = call(args, "GET", _path(args.model))["rollouts"]
    headers = ("rollout", "version", "stable", "state", "canary", "started", "reason")
    rows = rollout_rows(rollouts)
    for line in render_table(headers, rows, fancy=is_terminal()) if rows else ["(no rollout)"]:
        out(line)
    return 0


def cmd_command(args: argparse.Namespace, out: Out, action: str) -> int:
    describe(call(args, "POST", _path(args.model, args.id, action)), out)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    client_options(p, "admin")


def _start_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], out: Out) -> None:
    p = sub.add_parser("start", help="roll a signed version out behind a canary and gates")
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--canary", type=float, default=None, help="percent of traffic (default 10)")
    p.add_argument("--stages", type=stages, default=None, help="percents per stage, e.g. 10,50")
    p.add_argument("--window", dest="window_s", type=float, default=None, help="s per stage")
    p.add_argument("--min-requests", type=int, default=None, help="candidate requests per stage")
    p.add_argument("--max-error-rate", type=float, default=None)
    p.add_argument("--max-p99-ratio", type=float, default=None)
    p.add_argument("--min-accuracy", type=float, default=None, help="from feedback labels")
    p.add_argument("--min-metric", type=float, default=None, help="model's metric, from labels")
    p.add_argument("--max-metric", type=float, default=None, help="(lower-is-better metrics)")
    p.add_argument(
        "--metric-margin", type=float, default=None, help="worse than stable's label metric by"
    )
    p.add_argument("--min-labels", type=int, default=None)
    p.add_argument("--no-auto-promote", action="store_true", help="wait for 'promote'")
    p.add_argument("--wait", action="store_true", help="follow it; exit 0 only if promoted")
    p.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=functools.partial(cmd_start, out=out))


def add_rollout_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], out: Out) -> None:
    """Register ``fedgate rollout`` and its subcommands; ``out`` writes their lines."""
    rollout = sub.add_parser("rollout", help="start, follow, promote or roll back rollouts")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)
    _start_parser(rsub, out)
    status = rsub.add_parser("status", help="a model's rollouts, or one with its events")
    status.add_argument("id", nargs="?", default=None, help="rollout id (default: list all)")
    status.add_argument("--model", default="digits")
    _common(status)
    status.set_defaults(func=functools.partial(cmd_status, out=out))
    for action, text in (
        ("promote", "send all traffic to the candidate now"),
        ("rollback", "send all traffic back to the stable version"),
    ):
        p = rsub.add_parser(action, help=text)
        p.add_argument("id", help="rollout id")
        p.add_argument("--model", default="digits")
        _common(p)
        p.set_defaults(func=functools.partial(cmd_command, out=out, action=action))
