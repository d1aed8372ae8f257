"""One edge-id validator (fedcore.edge_id): every entrance that takes an edge id refuses
the same strings and accepts the same strings: the edge's settings, heartbeats (gateway
and trainer fleets), update subjects (edge publisher, trainer ingest), update headers,
the trainer's ledger, the registry and the gateway's mirror of it, the broker's
permissions and the CLI (keys, TLS)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_runtime.settings import EdgeSettings
from fedcore.edge_id import check_edge_id, is_edge_id
from fedcore.enrollment import EdgeRecord, EdgeRegistry
from fedcore.envelope_header import UpdateHeader
from fedcore.errors import FedgateError
from fedcore.keys import public_hex
from fedcore.transport import UPDATES_PREFIX, parse_update_subject, update_subject
from fedcore.wire import Heartbeat
from fedgate.keys_cmd import KeyLayout
from fedgate.nats_accounts import edge_permissions
from fedgate.tls_cmd import TlsPlan, create_tls
from gateway.enrolled import EnrolledEdges
from tests.test_edge_identity import required
from trainer.ledger import ledger_key

BAD = [
    "",
    "Edge-1",
    "-edge",
    "edge_1",
    "edge.1",
    "edge 1",
    "edge-1\n",  # passed the kernel's old check_edge_id (a '$'-anchored match)
    "edge-é",
    "a" * 64,
    "edge-1.>",
]
GOOD = ["edge-1", "0", "store-0042", "a" * 63]
RECORD = EdgeRecord(public_hex(ed25519.Ed25519PrivateKey.generate()), "2026-01-02T03:04:05Z")


def _header(edge_id: str) -> object:
    return UpdateHeader(
        suite="x25519",
        model="digits",
        round=1,
        edge_id=edge_id,
        base_version=0,
        base_digest="0" * 64,
        update_id="0" * 32,
        payload_len=0,
        chunk_size=64,
        chunk_count=1,
        compression="none",
        num_samples=0,
    )


def _heartbeat(edge_id: str) -> object:
    doc = {"edge_id": edge_id, "url": "http://e:8000", "seq": 1, "ts": 0.0, "models": {}}
    return Heartbeat.decode(json.dumps(doc).encode())


def _gateway_mirror(edge_id: str) -> None:
    edges = EnrolledEdges()
    edges.apply(edge_id, RECORD.encode(), deleted=False)
    if not edges.allows(edge_id):
        raise FedgateError(f"{edge_id!r} not enrolled")


def _entrances(tmp_path: Path) -> dict[str, Callable[[str], object]]:
    counter = iter(range(1000))
    return {
        "kernel": check_edge_id,
        "edge settings": lambda e: EdgeSettings(edge_id=e, **required(tmp_path)),  # type: ignore[arg-type]
        "heartbeat": _heartbeat,
        "update subject (edge)": lambda e: update_subject("digits", e),
        "update subject (trainer)": lambda e: parse_update_subject(f"{UPDATES_PREFIX}.digits.{e}"),
        "update header": _header,
        "ledger key": lambda e: ledger_key("digits", 1, e),
        "registry": lambda e: EdgeRegistry({e: RECORD}),
        "gateway mirror": _gateway_mirror,
        "broker permissions": edge_permissions,
        "cli keys": lambda e: KeyLayout(tmp_path / "keys").edge_key(e),
        "cli tls": lambda e: create_tls(TlsPlan(tmp_path / f"tls-{next(counter)}", (e,))),
    }


def _accepts(entrance: Callable[[str], object], edge_id: str) -> bool:
    try:
        entrance(edge_id)
    except (ValueError, FedgateError):  # pydantic's ValidationError is a ValueError
        return False
    return True


def test_every_entrance_refuses_the_same_invalid_ids(tmp_path: Path) -> None:
    accepted = {
        (name, bad)
        for name, entrance in _entrances(tmp_path).items()
        for bad in BAD
        if _accepts(entrance, bad)
    }
    assert accepted == set()


def test_every_entrance_accepts_the_same_valid_ids(tmp_path: Path) -> None:
    refused = {
        (name, good)
        for name, entrance in _entrances(tmp_path).items()
        for good in GOOD
        if not _accepts(entrance, good)
    }
    assert refused == set()


@pytest.mark.parametrize("value", [*BAD, *GOOD, None, 1, b"edge-1"])
def test_is_edge_id_and_check_edge_id_agree(value: object) -> None:
    valid = is_edge_id(value)
    assert valid == (value in GOOD)
    if isinstance(value, str):
        assert _accepts(check_edge_id, value) == valid
