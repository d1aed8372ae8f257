"""``fedgate config show`` and ``fedgate config docs``: the settings, explained.

``show`` prints the effective settings of every service of a local stack (what ``fedgate up``
with the same ``--config`` and ``--set`` would pass), each with its source; secrets are
masked. ``docs`` prints docs/settings.md, generated from the settings classes.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from fedcore.settings import env_prefix
from fedgate.display import render_table
from fedgate.stack_settings import MANAGED, SERVICES, collect, masked

Out = Callable[[str], None]

DOC_HEADER = """# Settings

Generated from the settings classes by `fedgate config docs > docs/settings.md`; a test
fails when this file is stale. Each service reads its settings from environment variables
with its prefix (`FEDGATE_GATEWAY_PORT`), or, under `fedgate up` and `fedgate demo`, from
`fedgate.toml` tables (`[gateway]`, `[trainer]`, `[edge]`, keys in lower case) and
`--set service.key=value`. Unknown keys and variables are refused with the closest real
setting. "stack" marks what `fedgate up` sets itself (ports, users, keys, directories).
`fedgate config show` prints the effective values and where each came from.
"""


def cmd_show(args: argparse.Namespace, out: Out) -> int:
    settings = collect(args.config, args.sets)
    for service in SERVICES:
        if args.service and service != args.service:
            continue
        rows = [(s.name, masked(s), s.source) for s in settings.effective(service)]
        out(f"[{service}]  (environment prefix {env_prefix(SERVICES[service])})")
        for line in render_table(("setting", "value", "source"), rows):
            out("  " + line)
        out("")
    return 0


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "computed"  # e.g. <hostname>-<pid>: the description says how
    value: Any = info.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{value}`"


def settings_markdown() -> str:
    """docs/settings.md: one table per service, every setting with its default and meaning."""
    parts = [DOC_HEADER]
    for service, cls in SERVICES.items():
        prefix = env_prefix(cls)
        parts.append(f"\n## {service} (`{prefix}*`)\n\n{(cls.__doc__ or '').strip()}\n")
        parts.append("\n| variable | default | meaning |\n| --- | --- | --- |\n")
        for name, info in cls.model_fields.items():
            text = (info.description or "").replace("|", "\\|").replace("\n", " ")
            where = " (stack)" if name in MANAGED[service] else ""
            parts.append(f"| `{prefix}{name.upper()}`{where} | {_default(info)} | {text} |\n")
    return "".join(parts)


def cmd_docs(args: argparse.Namespace, out: Out) -> int:
    out(settings_markdown().rstrip("\n"))
    return 0


def add_config_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], out: Out) -> None:
    """Register ``fedgate config show|docs``."""
    config = sub.add_parser("config", help="the services' settings: effective values, docs")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="effective settings of every service, with sources")
    show.add_argument("service", nargs="?", choices=sorted(SERVICES), help="only this service")
    show.add_argument("--config", type=Path, default=None, metavar="FILE", help="fedgate.toml")
    show.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="SERVICE.KEY=VALUE"
    )
    show.set_defaults(func=functools.partial(cmd_show, out=out))
    docs = csub.add_parser("docs", help="print docs/settings.md (generated from the classes)")
    docs.set_defaults(func=functools.partial(cmd_docs, out=out))
