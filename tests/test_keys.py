"""Key files: private keys are 0600 and loose permissions are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedcore.errors import KeyFileError
from fedcore.keys import (
    ed25519_public_from_hex,
    generate_ed25519,
    generate_x25519,
    load_ed25519,
    load_x25519,
    public_hex,
    read_secret,
    write_secret,
)


def test_private_keys_are_owner_only_and_round_trip(tmp_path: Path) -> None:
    key = generate_ed25519(tmp_path / "k" / "id.key")
    assert stat.S_IMODE((tmp_path / "k" / "id.key").stat().st_mode) == 0o600
    assert public_hex(load_ed25519(tmp_path / "k" / "id.key")) == public_hex(key)
    pub = ed25519_public_from_hex(public_hex(key))
    pub.verify(key.sign(b"m"), b"m")
    x = generate_x25519(tmp_path / "x.key")
    assert public_hex(load_x25519(tmp_path / "x.key")) == public_hex(x)


def test_loose_permissions_and_wrong_types_are_refused(tmp_path: Path) -> None:
    generate_ed25519(tmp_path / "id.key")
    os.chmod(tmp_path / "id.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_ed25519(tmp_path / "id.key")
    generate_x25519(tmp_path / "x.key")
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_ed25519(tmp_path / "x.key")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_ed25519(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="not a hex-encoded"):
        ed25519_public_from_hex("zz")


def test_secrets_are_owner_only(tmp_path: Path) -> None:
    write_secret(tmp_path / "s", "hunter2")
    assert read_secret(tmp_path / "s") == "hunter2"
    os.chmod(tmp_path / "s", 0o640)
    with pytest.raises(KeyFileError):
        read_secret(tmp_path / "s")


def test_write_file_never_writes_into_an_old_file_or_through_a_symlink(tmp_path: Path) -> None:
    from fedcore.files import write_atomic as write_file

    path = tmp_path / "tls.key"
    path.write_bytes(b"old key")
    path.chmod(0o644)
    with path.open("rb") as before:  # someone who opened the loose file earlier
        write_file(path, b"new key", 0o600)
        assert before.read() == b"old key"  # ...does not see the new key
    assert path.read_bytes() == b"new key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    write_file(link, b"secret", 0o600)
    assert target.read_bytes() == b"untouched" and not link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link.key", "tls.key"]
