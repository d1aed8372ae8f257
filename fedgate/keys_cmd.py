"""``fedgate keys init|enroll|revoke|list``: trainer keys, edge identities, edge registry.

Layout of a keys directory (default ``.fedgate/keys``, the one ``fedgate up`` uses)::

    trainer-signing.{key,pub}   Ed25519: signs model versions (edges trust the .pub)
    trainer-hpke.{key,pub}      HPKE (X25519, or with --kem the hybrid ML-KEM-768+X25519):
                                edges seal updates to the .pub, which names its KEM
    edges/<edge>.{key,pub}      Ed25519 identity of each edge (the .key belongs on the edge)
    edge-registry.json          enrolled edge public keys, read by the trainer

Private keys are PEM files with mode 0600 (:mod:`fedcore.keys`); public keys are hex.
Every command is idempotent: existing keys are kept, never overwritten (``init --kem``
naming another KEM than the existing HPKE key's is refused). Only public keys and file
paths are ever written to the terminal.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedcore.edge_id import check_edge_id
from fedcore.enrollment import EdgeRegistry, load_registry, save_registry
from fedcore.errors import FedgateError
from fedcore.keys import (
    KEMS,
    generate_ed25519,
    generate_hpke_key,
    load_ed25519,
    load_hpke_key,
    public_hex,
    write_public,
)

DEFAULT_DIR = Path(".fedgate/keys")


@dataclass(frozen=True)
class KeyLayout:
    """Where each key of a keys directory lives."""

    root: Path

    @property
    def signing_key(self) -> Path:
        return self.root / "trainer-signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "trainer-signing.pub"

    @property
    def hpke_key(self) -> Path:
        return self.root / "trainer-hpke.key"

    @property
    def hpke_pub(self) -> Path:
        return self.root / "trainer-hpke.pub"

    @property
    def registry(self) -> Path:
        return self.root / "edge-registry.json"

    def edge_key(self, edge_id: str) -> Path:
        return self.root / "edges" / f"{check_edge_id(edge_id)}.key"

    def edge_pub(self, edge_id: str) -> Path:
        return self.root / "edges" / f"{check_edge_id(edge_id)}.pub"


def ensure_trainer_keys(layout: KeyLayout, kem: str | None = None) -> str:
    """Create the trainer's signing and HPKE keys if missing; (re)write their .pub files.

    ``kem`` picks the HPKE KEM of a new key (None: ``x25519``); an existing key of another
    KEM is refused, never replaced. Returns the HPKE key's KEM."""
    signing = (
        load_ed25519(layout.signing_key)
        if layout.signing_key.exists()
        else generate_ed25519(layout.signing_key)
    )
    write_public(layout.signing_pub, public_hex(signing))
    if layout.hpke_key.exists():
        hpke = load_hpke_key(layout.hpke_key)
        if kem is not None and hpke.kem != kem:
            raise FedgateError(
                f"{layout.hpke_key} is an HPKE key of KEM {hpke.kem}, not {kem}; keys are "
                "never overwritten: move it away (edges then need the new .pub) or use "
                "another --dir"
            )
    else:
        hpke = generate_hpke_key(layout.hpke_key, kem or "x25519")
    write_public(layout.hpke_pub, hpke.public_text)
    return hpke.kem


def hpke_kem(layout: KeyLayout) -> str:
    """The KEM of the trainer's HPKE key in ``layout`` (for the trainer's ``HPKE_KEM``)."""
    return load_hpke_key(layout.hpke_key).kem


def ensure_edge_identity(layout: KeyLayout, edge_id: str) -> str:
    """Create ``edge_id``'s Ed25519 identity if missing; returns its public key (hex)."""
    path = layout.edge_key(edge_id)
    key = load_ed25519(path) if path.exists() else generate_ed25519(path)
    public = public_hex(key)
    write_public(layout.edge_pub(edge_id), public)
    return public


def enroll_edge(
    layout: KeyLayout, edge_id: str, *, public_key: str | None = None, replace: bool = False
) -> str:
    """Enroll ``edge_id`` in the registry; returns the public key enrolled.

    Without ``public_key`` the edge's identity in this directory is used (created if
    missing); with it, only the public key is recorded (the private key stays on the edge).
    """
    public = public_key if public_key is not None else ensure_edge_identity(layout, edge_id)
    registry = load_registry(layout.registry, missing_ok=True)
    updated = registry.enroll(check_edge_id(edge_id), public, replace_key=replace)
    if updated is not registry or not layout.registry.exists():
        save_registry(layout.registry, updated)
    return updated[edge_id].public_key


def revoke_edge(layout: KeyLayout, edge_id: str) -> None:
    """Mark ``edge_id`` revoked in the registry (the trainer refuses its updates)."""
    registry = load_registry(layout.registry)
    updated = registry.revoke(edge_id)
    if updated is not registry:
        save_registry(layout.registry, updated)


def init_keys(root: Path, edge_ids: list[str], kem: str | None = None) -> KeyLayout:
    """Trainer keys (a new HPKE key of ``kem``, default ``x25519``), then each edge's
    identity, enrolled. Idempotent."""
    layout = KeyLayout(root)
    ensure_trainer_keys(layout, kem)
    registry = load_registry(layout.registry, missing_ok=True)
    if not layout.registry.exists():
        save_registry(layout.registry, registry)
    for edge_id in edge_ids:
        enroll_edge(layout, edge_id)
    return layout


# -- the command line ----------------------------------------------------------------------
Out = Callable[[str], None]


def _describe(registry: EdgeRegistry, out: Out) -> None:
    for edge_id, record in registry.items():
        state = f"revoked {record.revoked_at}" if record.revoked else "active"
        out(f"{edge_id}  {record.public_key}  enrolled {record.enrolled_at}  {state}")


def cmd_init(args: argparse.Namespace, out: Out) -> int:
    if args.edges < 0:
        raise FedgateError("--edges must not be negative")
    layout = init_keys(args.dir, [f"edge-{i + 1}" for i in range(args.edges)], args.kem)
    out(f"trainer signing key: {layout.signing_key} (public {layout.signing_pub})")
    out(f"trainer HPKE key:    {layout.hpke_key} (public {layout.hpke_pub}), {hpke_kem(layout)}")
    out(f"edge registry:       {layout.registry}")
    _describe(load_registry(layout.registry), out)
    return 0


def cmd_enroll(args: argparse.Namespace, out: Out) -> int:
    layout = KeyLayout(args.dir)
    public = enroll_edge(layout, args.edge_id, public_key=args.public_key, replace=args.replace)
    out(f"{args.edge_id} enrolled with public key {public} in {layout.registry}")
    return 0


def cmd_revoke(args: argparse.Namespace, out: Out) -> int:
    layout = KeyLayout(args.dir)
    revoke_edge(layout, args.edge_id)
    out(f"{args.edge_id} revoked in {layout.registry}")
    return 0


def cmd_list(args: argparse.Namespace, out: Out) -> int:
    _describe(load_registry(KeyLayout(args.dir).registry), out)
    return 0


def _edge_id_arg(value: str) -> str:
    try:
        return check_edge_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_keys_commands(
    keys_sub: argparse._SubParsersAction[argparse.ArgumentParser], out: Callable[[str], None]
) -> None:
    """Register ``init``, ``enroll``, ``revoke`` and ``list`` under ``fedgate keys``;
    ``out`` writes their report lines."""

    def command(name: str, help_text: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        p = keys_sub.add_parser(name, help=help_text)
        p.add_argument(
            "--dir", type=Path, default=DEFAULT_DIR, help=f"keys directory (default {DEFAULT_DIR})"
        )
        p.set_defaults(func=functools.partial(func, out=out))
        return p

    init = command("init", "create the trainer's keys and N enrolled edge identities", cmd_init)
    init.add_argument("--edges", type=int, default=2, help="identities edge-1..edge-N (default 2)")
    init.add_argument(
        "--kem",
        choices=KEMS,
        default=None,
        help="KEM of a new trainer HPKE key: x25519 (default) or mlkem768-x25519 (hybrid "
        "post-quantum; set FEDGATE_TRAINER_HPKE_KEM to match); an existing key is kept",
    )
    enroll = command("enroll", "add an edge's public key to the registry", cmd_enroll)
    enroll.add_argument("edge_id", type=_edge_id_arg)
    enroll.add_argument("--public-key", help="hex Ed25519 public key made on the edge itself")
    enroll.add_argument(
        "--replace", action="store_true", help="give an enrolled or revoked edge a new key"
    )
    revoke = command("revoke", "refuse an edge's updates from now on", cmd_revoke)
    revoke.add_argument("edge_id", type=_edge_id_arg)
    command("list", "print the edge registry", cmd_list)
