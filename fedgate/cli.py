"""fedgate: an inference gateway whose edges learn from their own traffic.

Exit codes: 0 ok; 1 a refused or failed operation; 2 bad usage or settings; 3 a server
could not be reached."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fedcore.errors import ConfigError, FedgateError, ModelSpecError, UnreachableError
from fedcore.logs import configure_logging
from fedcore.models import use_models
from fedcore.secagg import SecAggConfig
from fedcore.secagg.config import MIN_PARTICIPANTS
from fedcore.settings import LOG_LEVELS
from fedcore.version import package_version
from fedgate.config_cmd import add_config_parser
from fedgate.display import is_terminal
from fedgate.keys_cmd import add_keys_commands
from fedgate.launcher import Stack, StackConfig
from fedgate.progress import Waits, is_interactive
from fedgate.restarts import STATUS_FILE, CrashLoop
from fedgate.rollout_cmd import add_rollout_parser
from fedgate.stack_settings import StackSettings, collect
from fedgate.status import client_options
from fedgate.tls_cmd import add_tls_parser

log = logging.getLogger("fedgate")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _add_stack_args(p: argparse.ArgumentParser, data_dir: str) -> None:
    p.add_argument("--edges", type=int, default=2, help="number of edge runtimes (default 2)")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="REF",
        default=None,
        help="a model to serve, repeatable: a built-in (digits, diabetes, digits_conv), an "
        "entry point of group fedgate.models, or package.module:SPEC (default: digits)",
    )
    p.add_argument("--port", type=int, default=8080, help="gateway HTTP port (default 8080)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(data_dir),
        help=f"state directory (default {data_dir})",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="log level of every service and of this command (default INFO)",
    )
    _add_settings_args(p)
    p.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        choices=(1, 3, 5),
        metavar="N",
        help="nats-server processes: 1 (default), or a JetStream cluster of 3 or 5 with "
        "routes, every stream and bucket at 3 replicas",
    )
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        metavar="N",
        help="gateway replicas on --port, --port + 1, ... (default 1); they share splits, "
        "gate counts and one acting rollout controller through NATS",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between the services and NATS: a development CA and one client "
        "certificate per service in <data-dir>/tls (reused while valid)",
    )
    p.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation for every model: the trainer learns only the sum of the "
        "edges' updates (needs --edges >= 3; see docs/secagg.md)",
    )
    p.add_argument(
        "--secagg-clip-norm",
        type=float,
        default=1.0,
        help="with --secagg: L2 norm each edge clips its update to (default 1.0)",
    )


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="settings file (fedgate.toml): one table per service, [gateway], [trainer], "
        "[edge], keys as in docs/settings.md",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SERVICE.KEY=VALUE",
        help="one setting, e.g. --set trainer.min_updates=3 (repeatable; wins over the file "
        "and over FEDGATE_* variables)",
    )


def _refs(args: argparse.Namespace) -> list[str]:
    """The --model references, each resolved (without torch checks) or refused (exit 2)."""
    refs: list[str] = getattr(args, "models", None) or []
    try:
        use_models(refs, deep=False)
    except ModelSpecError as exc:
        raise ConfigError(f"--model: {exc}") from None
    return refs


def _model_names(settings: StackSettings) -> list[str]:
    """The names of the models the stack's trainer runs (its MODELS, else the default)."""
    given = settings.values["trainer"].get("models")
    refs: Any = given[0] if given else ["digits"]
    if isinstance(refs, str):
        try:
            refs = json.loads(refs)
        except ValueError:
            refs = [refs]
    return use_models([str(r) for r in refs] or ["digits"], deep=False)


def _flag_settings(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Settings that the command's own flags imply (--model, --secagg), by service."""
    out: dict[str, dict[str, str]] = {}
    refs = _refs(args)
    if refs:  # every service resolves the same references
        out = {s: {"models": json.dumps(refs)} for s in ("trainer", "edge", "gateway")}
    if not getattr(args, "secagg", False):
        return out
    if args.edges < MIN_PARTICIPANTS:
        raise FedgateError(
            f"--secagg needs at least {MIN_PARTICIPANTS} edges (got --edges {args.edges}): "
            "with fewer, the sum would reveal a single edge's update to the other"
        )
    try:
        options = SecAggConfig(clip_norm=args.secagg_clip_norm)
    except ConfigError as exc:
        raise FedgateError(f"--secagg-clip-norm: {exc}") from None
    models = use_models(refs or ["digits"], deep=False)  # what the stack's trainer runs
    per_model = json.dumps({m: {"clip_norm": options.clip_norm} for m in models})
    for service in ("trainer", "edge"):
        out.setdefault(service, {})["secagg"] = per_model
    return out


def _stack_config(args: argparse.Namespace) -> StackConfig:
    if args.edges < 1:
        raise FedgateError("--edges must be at least 1")
    if not 1 <= args.gateways <= 8:
        raise ConfigError("--gateways must be from 1 to 8")
    settings = collect(args.config, args.sets, _flag_settings(args))
    names = _model_names(settings)
    return StackConfig(
        data_dir=args.data_dir.resolve(),
        edges=args.edges,
        port=args.port,
        log_level=args.log_level,
        tls=args.tls,
        nats_cluster=args.nats_cluster,
        gateways=args.gateways,
        overrides=settings.env_overrides(),
        models=tuple(names),
    )


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_up(args: argparse.Namespace) -> int:
    stack = Stack(_stack_config(args))
    try:
        _out(f"starting {args.edges} edge(s); logs under {stack.config.data_dir / 'logs'}")
        with (
            Waits(_out, live=is_interactive()) as waits,
            waits.wait("the stack to start", steps=stack.start_steps - 1) as wait,
        ):
            stack.start(wait.stepper())
        for url in stack.gateway_urls:
            _out(f"gateway:  {url}  (Open Inference Protocol v2 under /v2)")
        _out(f"fleet:    {stack.gateway_url}/v1/edges")
        _out(f"nats:     {stack.nats_url}")
        if stack.tls is not None:
            _out(f"          mutual TLS; CA and client certificates in {stack.tls.directory}")
        _out(f"api keys: admin {stack.admin_key_file}, infer {stack.infer_key_file}")
        _out("          send 'Authorization: Bearer <key>' with every request")
        urls = stack.metrics_urls()
        _out(f"metrics:  gateway {urls['gateway']} (API key), trainer {urls['trainer']}")
        for edge_id, ports in stack.edge_ports.items():
            _out(
                f"{edge_id}:   triton http://{stack.config.host}:{ports.http} (private to the edge)"
                f", metrics {urls[edge_id]}"
            )
        _out(
            f"ready; Ctrl-C stops the stack (a service that exits is restarted; "
            f"restarts in {stack.config.data_dir / STATUS_FILE}, shown by 'fedgate status')"
        )
        while True:
            time.sleep(0.25)
            stack.check()
    except CrashLoop as exc:
        log.error("%s", exc)
        return 1
    except Interrupted as sig:
        _out(f"{sig}: stopping")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        _out("stopped")


def cmd_demo(args: argparse.Namespace) -> int:
    from fedgate.demo import run_demo

    if args.rounds < 1:
        raise FedgateError("--rounds must be at least 1")
    config = _stack_config(args)
    live = is_interactive()
    return run_demo(config, _out, rounds=args.rounds, asynchronous=args.asynchronous, live=live)


def cmd_status(args: argparse.Namespace) -> int:
    from fedgate.status import print_status, status_document

    if args.output == "json":
        options = {"model": args.model, "rounds": args.rounds, "data_dir": args.data_dir}
        doc = status_document(args.url, args.key_file, cacert=args.cacert, **options)
        _out(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    return print_status(
        args.url,
        _out,
        args.key_file,
        model=args.model,
        rounds=args.rounds,
        data_dir=args.data_dir,
        cacert=args.cacert,
        fancy=is_terminal(),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fedgate {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole stack locally until Ctrl-C")
    _add_stack_args(up, ".fedgate")
    up.set_defaults(func=cmd_up)
    demo = sub.add_parser(
        "demo", help="the whole loop: traffic, labels, idle learning, rounds, rollouts, a table"
    )
    _add_stack_args(demo, ".fedgate/demo")
    demo.set_defaults(edges=3)
    demo.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    demo.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="buffered async rounds: a buffer closes when every edge's update is in, or "
        "at its timeout with all but one; a straggler's stale update joins a later one",
    )
    demo.set_defaults(func=cmd_demo)
    status = sub.add_parser(
        "status", help="print fleet, versions, rounds and rollouts of a running gateway"
    )
    client_options(status, "admin or infer")
    status.add_argument("--model", default=None, help="only this model (default: all served)")
    status.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".fedgate"),
        help="state directory of a local 'fedgate up' (default .fedgate): its processes "
        "and their restarts are shown first",
    )
    status.add_argument("--rounds", type=int, default=10, help="closed rounds to list")
    status.add_argument(
        "--output",
        choices=("table", "json"),
        default="table",
        help="table (default: drawn on a terminal, plain text in a pipe) or json (the "
        "gateway's answers and the launcher's status, for scripts)",
    )
    status.set_defaults(func=cmd_status)
    add_rollout_parser(sub, _out)
    add_config_parser(sub, _out)
    keys = sub.add_parser("keys", help="create keys and certificates")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add_tls_parser(keys_sub, _out)
    add_keys_commands(keys_sub, _out)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("fedgate", getattr(args, "log_level", "INFO"), json_lines=False)
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        code: int = args.func(args)
    except (ConfigError, ModelSpecError) as exc:  # bad settings or --model: bad usage
        log.error("%s", exc)
        return 2
    except UnreachableError as exc:
        log.error("%s", exc)
        return 3
    except FedgateError as exc:
        log.error("%s", exc)
        return 1
    except Interrupted:
        return 130
    except BrokenPipeError:  # `fedgate config show | head`
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
