"""Keys and enrollment: ``fedgate keys``, the edge registry file, and its reloading."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedcore.enrollment import EdgeRecord, EdgeRegistry, EdgeStatus, load_registry
from fedcore.errors import EnrollmentError, KeyFileError
from fedcore.keys import load_ed25519, load_x25519, public_hex
from fedgate.cli import main
from fedgate.keys_cmd import KeyLayout, enroll_edge, init_keys, revoke_edge
from trainer.registry import RegistryFile

NOW = "2026-01-02T03:04:05Z"


def a_key() -> str:
    return public_hex(ed25519.Ed25519PrivateKey.generate())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_private_keys_0600_and_enrolls_edges(tmp_path: Path) -> None:
    layout = init_keys(tmp_path / "keys", ["edge-1", "edge-2"])
    for private in (
        layout.signing_key,
        layout.hpke_key,
        *map(layout.edge_key, ["edge-1", "edge-2"]),
    ):
        assert mode(private) == 0o600
    assert load_x25519(layout.hpke_key) is not None
    registry = load_registry(layout.registry)
    assert list(registry) == ["edge-1", "edge-2"]
    edge1 = load_ed25519(layout.edge_key("edge-1"))
    assert registry["edge-1"].public_key == public_hex(edge1)
    assert layout.edge_pub("edge-1").read_text().strip() == public_hex(edge1)
    assert layout.hpke_pub.read_text().strip() == public_hex(load_x25519(layout.hpke_key))

    before = {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()}
    again = init_keys(tmp_path / "keys", ["edge-1", "edge-2", "edge-3"])  # idempotent, grows
    for path, data in before.items():
        if path != layout.registry:
            assert path.read_bytes() == data, path
    grown = load_registry(again.registry)
    assert list(grown) == ["edge-1", "edge-2", "edge-3"]
    assert grown["edge-1"] == registry["edge-1"]


def test_enroll_with_a_public_key_only_and_revoke(tmp_path: Path) -> None:
    layout = init_keys(tmp_path, [])
    public = a_key()
    assert enroll_edge(layout, "edge-9", public_key=public) == public
    assert not layout.edge_key("edge-9").exists()  # the private key stays on the edge
    assert enroll_edge(layout, "edge-9", public_key=public) == public  # no-op
    with pytest.raises(EnrollmentError) as info:
        enroll_edge(layout, "edge-9", public_key=a_key())
    assert info.value.reason == "already-enrolled"
    revoke_edge(layout, "edge-9")
    registry = load_registry(layout.registry)
    assert registry.status("edge-9") is EdgeStatus.REVOKED and registry.lookup("edge-9") is None
    assert registry.lookup_any("edge-9") is not None
    with pytest.raises(EnrollmentError) as info:
        enroll_edge(layout, "edge-9", public_key=public, replace=True)
    assert info.value.reason == "key-revoked"
    with pytest.raises(EnrollmentError) as info:
        enroll_edge(layout, "edge-10", public_key=public)  # a revoked key, under another name
    assert info.value.reason == "key-revoked"
    fresh = a_key()
    enroll_edge(layout, "edge-9", public_key=fresh, replace=True)
    assert load_registry(layout.registry).status("edge-9") is EdgeStatus.ACTIVE
    with pytest.raises(EnrollmentError) as info:
        revoke_edge(layout, "edge-77")
    assert info.value.reason == "unknown-edge"


def test_cli_keys_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    assert main(["keys", "init", "--dir", d, "--edges", "2"]) == 0
    out = capsys.readouterr().out
    assert "edge-1" in out and "edge-2" in out and "active" in out
    assert "PRIVATE KEY" not in out
    assert main(["keys", "enroll", "edge-3", "--dir", d]) == 0
    assert main(["keys", "revoke", "edge-2", "--dir", d]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--dir", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["edge-1", "edge-2", "edge-3"]
    assert "revoked" in lines[1] and "active" in lines[2]
    assert main(["keys", "revoke", "edge-8", "--dir", d]) == 1
    assert main(["keys", "enroll", "edge-4", "--dir", d, "--public-key", "zz"]) == 1


def test_loose_private_key_is_refused(tmp_path: Path) -> None:
    layout = init_keys(tmp_path, ["edge-1"])
    os.chmod(layout.hpke_key, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        init_keys(tmp_path, ["edge-1"])


def _record(**changes: object) -> dict[str, object]:
    record: dict[str, object] = {
        "public_key": a_key(),
        "revoked": False,
        "enrolled_at": NOW,
        "revoked_at": None,
    }
    record.update(changes)
    return record


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"Edge_1": _record()}).encode(),
        json.dumps({"edge-1": _record(public_key="ab")}).encode(),
        json.dumps({"edge-1": _record(public_key="00" * 31 + "0g")}).encode(),
        json.dumps({"edge-1": _record(revoked="no")}).encode(),
        json.dumps({"edge-1": _record(revoked=True)}).encode(),  # revoked without revoked_at
        json.dumps({"edge-1": _record(enrolled_at="yesterday")}).encode(),
        json.dumps({"edge-1": {**_record(), "extra": 1}}).encode(),
        json.dumps({"edge-1": {"public_key": a_key()}}).encode(),
        b'{"edge-1": {}, "edge-1": {}}',
    ],
)
def test_registry_decoding_is_strict(body: bytes) -> None:
    with pytest.raises(EnrollmentError) as info:
        EdgeRegistry.decode(body)
    assert info.value.reason == "malformed"


def test_a_key_enrolled_twice_is_refused() -> None:
    key = a_key()
    with pytest.raises(EnrollmentError, match="also enrolled"):
        EdgeRegistry({"a": EdgeRecord(key, NOW), "b": EdgeRecord(key, NOW)})


def test_registry_round_trips() -> None:
    registry = EdgeRegistry().enroll("edge-1", a_key(), now=NOW).enroll("edge-2", a_key(), now=NOW)
    registry = registry.revoke("edge-2", now=NOW)
    assert EdgeRegistry.decode(registry.encode()) == registry
    assert registry.status("edge-3") is EdgeStatus.UNKNOWN


def test_registry_file_reloads_on_change_and_keeps_the_last_good(tmp_path: Path) -> None:
    layout = KeyLayout(tmp_path)
    init_keys(tmp_path, ["edge-1"])
    watched = RegistryFile(layout.registry)
    assert watched.current().status("edge-1") is EdgeStatus.ACTIVE
    revoke_edge(layout, "edge-1")
    assert watched.current().status("edge-1") is EdgeStatus.REVOKED
    layout.registry.write_text("{broken")
    assert watched.current().status("edge-1") is EdgeStatus.REVOKED
    with pytest.raises(EnrollmentError):
        RegistryFile(tmp_path / "missing.json")
